"""2-D rotary position embedding and its training-free resolution extrapolation.

Half of each head's dims rotate with the token's row, half with its column (interleaved pairs,
rows first), as in the released FiTv2. Extrapolation rescales the frequencies by how much the
grid exceeds the training grid edge L0, either once for a fixed target grid or per image from
each image's own grid (what the released high-resolution models were post-trained with).

Everything here works on packed sequences: frequencies are computed per segment (S, a/2) and
gathered to tokens, so images of different sizes in one batch each get their own rotation.
"""

from __future__ import annotations

import math

import torch

from fitscale.models.config import ModelConfig

YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def base_frequencies(axis_dim: int, theta: float) -> torch.Tensor:
    """w_k = theta^(-2k/a), k = 0..a/2-1, float64 for exactness before the final cast."""
    k = torch.arange(axis_dim // 2, dtype=torch.float64)
    return theta ** (-2.0 * k / axis_dim)


def ramp_keep_mask(axis_dim: int, theta: float, base_grid: int) -> torch.Tensor:
    """NTK-by-parts / YaRN: 1 where a frequency keeps its original value, 0 where it is interpolated."""

    def correction_dim(num_rotations: float) -> float:
        return axis_dim * math.log(base_grid / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(YARN_BETA_FAST)), 0)
    high = min(math.ceil(correction_dim(YARN_BETA_SLOW)), axis_dim - 1)
    if low == high:
        high += 0.001
    k = torch.arange(axis_dim // 2, dtype=torch.float64)
    ramp = ((k - low) / (high - low)).clamp(0.0, 1.0)
    return 1.0 - ramp


def axis_frequencies(config: ModelConfig, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies (N, a/2) and YaRN magnitude (N,) for N scale factors s >= 1 of one axis."""
    axis_dim = config.head_dim // 2
    theta = config.rope_theta
    method = config.rope_method
    scale = scale.to(torch.float64)
    base = base_frequencies(axis_dim, theta).to(scale.device)
    ones = torch.ones_like(scale)
    if method == "none":
        return base.expand(scale.shape[0], -1), ones
    if method == "linear":
        return base / scale[:, None], ones
    if method == "ntk":
        log_theta = math.log(theta) + torch.log(scale) * (axis_dim / (axis_dim - 2))  # ln theta'
        k = torch.arange(axis_dim // 2, dtype=torch.float64, device=scale.device)
        return torch.exp(-(2.0 * k / axis_dim)[None, :] * log_theta[:, None]), ones
    keep = ramp_keep_mask(axis_dim, theta, config.rope_base_grid).to(scale.device)
    freqs = (base / scale[:, None]) * (1.0 - keep) + base * keep
    if method == "ntk_by_parts":
        return freqs, ones
    magnitude = torch.where(scale > 1.0, 0.1 * torch.log(scale) + 1.0, ones)  # yarn
    return freqs, magnitude


def attention_scale(config: ModelConfig, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """sqrt(log(2hw) / log(L0^2)) where 2hw > L0^2, else 1: grows attention logits with the token count."""
    area = 2.0 * rows.to(torch.float64) * cols.to(torch.float64)
    reference = float(config.rope_base_grid**2)
    factor = torch.sqrt(torch.log(area.clamp(min=1.0)) / math.log(reference))
    return torch.where(area > reference, factor, torch.ones_like(factor))


def segment_rope_tables(config: ModelConfig, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-segment row/col frequencies (S, a/2) and cos/sin magnitudes (S,) for row and col dims."""
    rows, cols = sizes[:, 0].to(torch.float64), sizes[:, 1].to(torch.float64)
    edge = float(config.rope_base_grid)
    if config.rope_decoupled:
        row_scale = (rows / edge).clamp(min=1.0)
        col_scale = (cols / edge).clamp(min=1.0)
    else:
        row_scale = col_scale = (torch.maximum(rows, cols) / edge).clamp(min=1.0)
    row_freqs, row_magnitude = axis_frequencies(config, row_scale)
    col_freqs, col_magnitude = axis_frequencies(config, col_scale)
    if config.rope_attn_scale:
        extra = attention_scale(config, rows, cols)
        row_magnitude = row_magnitude * extra
        col_magnitude = col_magnitude * extra
    return row_freqs, col_freqs, row_magnitude, col_magnitude


def rope_cos_sin(
    config: ModelConfig,
    pos: torch.Tensor,
    segment_ids: torch.Tensor,
    sizes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, d) float32 for every token of a packed sequence.

    pos (T, 2) row/col; segment_ids (T,) image index of each token; sizes (S, 2) grid rows/cols.
    """
    if config.rope_per_image:
        table_sizes = sizes  # (S, 2)
        token_table = segment_ids  # each token reads its own image's row of the table
    else:
        grid = config.rope_target_grid or (config.rope_base_grid, config.rope_base_grid)
        table_sizes = torch.tensor([grid], device=pos.device)  # (1, 2)
        token_table = torch.zeros_like(segment_ids)
    row_freqs, col_freqs, row_mag, col_mag = segment_rope_tables(config, table_sizes.to(pos.device))
    rows = pos[:, 0].to(torch.float64)  # (T,)
    cols = pos[:, 1].to(torch.float64)  # (T,)
    row_angles = rows[:, None] * row_freqs[token_table]  # (T, a/2)
    col_angles = cols[:, None] * col_freqs[token_table]  # (T, a/2)
    angles = torch.cat([row_angles, col_angles], dim=1).repeat_interleave(2, dim=1)  # (T, d)
    half = angles.shape[1] // 2
    magnitude = torch.cat(
        [row_mag[token_table, None].expand(-1, half), col_mag[token_table, None].expand(-1, half)], dim=1
    )  # (T, d)
    cos = (torch.cos(angles) * magnitude).to(torch.float32)
    sin = (torch.sin(angles) * magnitude).to(torch.float32)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, d) rotated by cos/sin (T, d): x*cos + rot(x)*sin, rot(x0, x1) = (-x1, x0), in fp32."""
    x32 = x.float()
    pairs = x32.unflatten(-1, (-1, 2))  # (T, H, d/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (T, H, d)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)
