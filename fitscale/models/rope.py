"""2-D rotary position embedding and its training-free resolution extrapolation.

Half of each head's dims rotate with the token's row, half with its column (interleaved pairs,
rows first), as in the released FiTv2. Extrapolation rescales the frequencies by how much the
grid exceeds the training grid edge L0, either once for a fixed target grid (the release's
sampling script: `max_pe_len_h/w` = the requested grid) or per image from each image's own grid
(the release's `online_rope`, which its high-resolution models were post-trained with).

Every method is the release's `VisionRotaryEmbedding` (whlzy/FiT `fit/model/rope.py`), for an
axis of a = head_dim/2 dims with a/2 frequencies w_k = theta^(-2k/a) and a scale s = max(1, L/L0),
where L is the axis's own length when decoupled and max(rows, cols) for both axes when coupled:

- `linear` (position interpolation): w_k / s.
- `ntk` (release `ntk-aware`): theta' = theta * s^(a/(a-2)), w_k = theta'^(-2k/a).
- `ntk_by_parts`: NTK frequencies for the dims that turn more than 1.25 times over L0 tokens,
  linear ones for those that turn less than 0.75 times (ramp between), then the original
  frequencies for the dims that turn more than 16 times (ramp down to 2).
- `yarn`: original frequencies above 32 turns, linear below 1 turn (ramp between); cos and sin
  multiplied by 0.1 ln(s_max) + 1 with s_max = max(1, max(rows, cols) / L0), one factor for
  both axes even when decoupled.
- `ntk_pro1` / `ntk_pro2`: NTK frequencies; cos and sin multiplied by
  sqrt(ln(2 max(rows, cols)) / ln(L0)) where 2 max(rows, cols) > L0 (pro1), or by
  sqrt(ln(2 rows cols) / ln(L0^2)) where 2 rows cols > L0^2 (pro2).

The release computes these magnitudes only for fixed frequencies (its online path has none);
with per-image frequencies, fitscale takes each image's own grid in the same formulas, so an
image gets exactly the tables the release's sampling script gives it at its own size.
`rope_attn_scale` (the paper's attention scale) multiplies cos and sin by the `ntk_pro2` factor
on top of any method other than the two `ntk_pro` ones.

Everything here works on packed sequences: frequencies and magnitudes are computed per segment
(S, a/2) and gathered to tokens, so images of different sizes in one batch each get their own
rotation. The frequencies are computed in float64 and cast to float32 at the end.
"""

from __future__ import annotations

import math

import torch

from fitscale.config.model import ModelConfig

# Turns over L0 tokens that bound the correction ramps (the release's constants, from YaRN).
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0  # yarn: original above 32 turns, linear below 1
PARTS_BETA = (1.25, 0.75)  # ntk_by_parts: NTK above 1.25 turns, linear below 0.75
PARTS_GAMMA = (16.0, 2.0)  # ntk_by_parts: original above 16 turns, the NTK/linear blend below 2
NTK_METHODS = ("ntk", "ntk_pro1", "ntk_pro2")


def base_frequencies(axis_dim: int, theta: float) -> torch.Tensor:
    """w_k = theta^(-2k/a), k = 0..a/2-1, float64 for exactness before the final cast."""
    k = torch.arange(axis_dim // 2, dtype=torch.float64)
    return theta ** (-2.0 * k / axis_dim)


def correction_ramp(
    axis_dim: int, theta: float, base_grid: int, fast_turns: float, slow_turns: float
) -> torch.Tensor:
    """(a/2,) float64: 0 for the frequencies that turn more than `fast_turns` times over L0 tokens,
    1 for those that turn less than `slow_turns` times, linear in k between.

    The bounds are YaRN's inverse-dim formula k(r) = a ln(L0 / (2 pi r)) / (2 ln theta), floored
    and ceiled, clamped to [0, a-1], and split by 0.001 when equal (release `find_correction_range`
    and `linear_ramp_mask`). A `high` below `low` (small L0) gives 0 everywhere, as released.
    """

    def turns_to_dim(turns: float) -> float:
        return axis_dim * math.log(base_grid / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(turns_to_dim(fast_turns)), 0)
    high = min(math.ceil(turns_to_dim(slow_turns)), axis_dim - 1)
    if low == high:
        high += 0.001
    k = torch.arange(axis_dim // 2, dtype=torch.float64)
    return ((k - low) / (high - low)).clamp(0.0, 1.0)


def axis_frequencies(config: ModelConfig, scale: torch.Tensor) -> torch.Tensor:
    """Frequencies (N, a/2) float64 of one axis for N scale factors s >= 1 (float64, any device)."""
    axis_dim = config.head_dim // 2
    theta = config.rope_theta
    method = config.rope_method
    scale = scale.to(torch.float64)
    base = base_frequencies(axis_dim, theta).to(scale.device)  # (a/2,)
    if method == "none":
        return base.expand(scale.shape[0], -1)
    linear = base / scale[:, None]  # (N, a/2)
    if method == "linear":
        return linear
    if method == "yarn":
        keep = 1.0 - correction_ramp(axis_dim, theta, config.rope_base_grid, YARN_BETA_FAST, YARN_BETA_SLOW)
        keep = keep.to(scale.device)
        return linear * (1.0 - keep) + base * keep
    log_theta = math.log(theta) + torch.log(scale) * (axis_dim / (axis_dim - 2))  # ln theta', (N,)
    k = torch.arange(axis_dim // 2, dtype=torch.float64, device=scale.device)
    ntk = torch.exp(-(2.0 * k / axis_dim)[None, :] * log_theta[:, None])  # (N, a/2)
    if method in NTK_METHODS:
        return ntk
    # ntk_by_parts: NTK/linear over the beta ramp, then that with the original over the gamma ramp.
    use_ntk = 1.0 - correction_ramp(axis_dim, theta, config.rope_base_grid, *PARTS_BETA).to(scale.device)
    blend = linear * (1.0 - use_ntk) + ntk * use_ntk
    keep = 1.0 - correction_ramp(axis_dim, theta, config.rope_base_grid, *PARTS_GAMMA).to(scale.device)
    return blend * (1.0 - keep) + base * keep


def log_length_scale(length: torch.Tensor, train_length: float) -> torch.Tensor:
    """sqrt(ln(2 L) / ln(L_train)) where 2 L > L_train, else 1 (release `get_proportion`), float64.

    `ntk_pro1` uses L = max(rows, cols), L_train = L0; `ntk_pro2` and the attention scale use
    L = rows * cols, L_train = L0^2. L_train must exceed 1 (ModelConfig checks it).
    """
    doubled = 2.0 * length.to(torch.float64)
    factor = torch.sqrt(torch.log(doubled.clamp(min=1.0)) / math.log(train_length))
    return torch.where(doubled > train_length, factor, torch.ones_like(factor))


def attention_scale(config: ModelConfig, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """sqrt(ln(2hw) / ln(L0^2)) where 2hw > L0^2, else 1: grows attention logits with the token count."""
    return log_length_scale(rows.to(torch.float64) * cols.to(torch.float64), float(config.rope_base_grid**2))


def rope_magnitude(config: ModelConfig, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The factor (S,) float64 that multiplies cos and sin of both axes, from each grid (rows, cols)."""
    rows, cols = rows.to(torch.float64), cols.to(torch.float64)
    longest = torch.maximum(rows, cols)
    edge = float(config.rope_base_grid)
    method = config.rope_method
    if method == "yarn":
        scale = (longest / edge).clamp(min=1.0)
        magnitude = torch.where(scale > 1.0, 0.1 * torch.log(scale) + 1.0, torch.ones_like(scale))
    elif method == "ntk_pro1":
        magnitude = log_length_scale(longest, edge)
    elif method == "ntk_pro2":
        magnitude = attention_scale(config, rows, cols)
    else:
        magnitude = torch.ones_like(rows)
    if config.rope_attn_scale:
        magnitude = magnitude * attention_scale(config, rows, cols)
    return magnitude


def segment_rope_tables(config: ModelConfig, sizes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row and column frequencies (S, a/2) and the cos/sin magnitude (S,), float64, for grids (S, 2)."""
    rows, cols = sizes[:, 0].to(torch.float64), sizes[:, 1].to(torch.float64)
    edge = float(config.rope_base_grid)
    if config.rope_decoupled:
        row_scale = (rows / edge).clamp(min=1.0)
        col_scale = (cols / edge).clamp(min=1.0)
    else:
        row_scale = col_scale = (torch.maximum(rows, cols) / edge).clamp(min=1.0)
    row_freqs = axis_frequencies(config, row_scale)
    col_freqs = axis_frequencies(config, col_scale)
    return row_freqs, col_freqs, rope_magnitude(config, rows, cols)


def rope_cos_sin(
    config: ModelConfig,
    pos: torch.Tensor,
    segment_ids: torch.Tensor,
    sizes: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, d) float32 for every token of a packed sequence.

    pos (T, 2) row/col; segment_ids (T,) image index of each token; sizes (S, 2) grid rows/cols.
    Fixed frequencies come from `rope_target_grid` (None: the L0 x L0 training grid).
    """
    if config.rope_per_image:
        table_sizes = sizes  # (S, 2)
        token_table = segment_ids  # each token reads its own image's row of the table
    else:
        grid = config.rope_target_grid or (config.rope_base_grid, config.rope_base_grid)
        table_sizes = torch.tensor([grid], device=pos.device)  # (1, 2)
        token_table = torch.zeros_like(segment_ids)
    row_freqs, col_freqs, magnitude = segment_rope_tables(config, table_sizes.to(pos.device))
    rows = pos[:, 0].to(torch.float64)  # (T,)
    cols = pos[:, 1].to(torch.float64)  # (T,)
    row_angles = rows[:, None] * row_freqs[token_table]  # (T, a/2)
    col_angles = cols[:, None] * col_freqs[token_table]  # (T, a/2)
    angles = torch.cat([row_angles, col_angles], dim=1).repeat_interleave(2, dim=1)  # (T, d)
    token_magnitude = magnitude[token_table, None]  # (T, 1)
    cos = (torch.cos(angles) * token_magnitude).to(torch.float32)
    sin = (torch.sin(angles) * token_magnitude).to(torch.float32)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, d) rotated by cos/sin (T, d): x*cos + rot(x)*sin, rot(x0, x1) = (-x1, x0), in fp32."""
    x32 = x.float()
    pairs = x32.unflatten(-1, (-1, 2))  # (T, H, d/2, 2)
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (T, H, d)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)
