"""The released FiTv2's 2-D RoPE and its extrapolation methods, to test fitscale against.

Written from whlzy/FiT `fit/model/rope.py` (`VisionRotaryEmbedding`, `get_1d_rope_freqs`,
`find_correction_range`, `linear_ramp_mask`, `get_mscale`, `get_proportion`) and from how
`fit/model/fit_model.py` and `sample_fitv2_ddp.py` call it, in the release's own terms:
`custom_freqs`, `decouple`, `ori_max_pe_len`, fixed frequencies for `max_pe_len_h/w` (what the
sampling script sets to the requested grid) or `online_rope` (each image's own `size`).
Nothing here comes from fitscale: frequencies are plain Python floats computed index by index in
the release's order of operations (float64 instead of the release's float32), so that a choice
made in fitscale.models.rope cannot hide behind the same choice here.

Two things the release leaves undefined, taken as fitscale documents them:
- with `online_rope`, yarn / ntk-aware-pro1 / ntk-aware-pro2 magnitudes (the release's online
  path reads `mscale` / `proportion1` / `proportion2`, which it sets only for fixed frequencies):
  the fixed-frequency formula evaluated at the image's own size; `normal` is plain RoPE there too.
- `attn_scale` (fitscale's `rope_attn_scale`, not in the release): cos and sin also multiplied by
  `get_proportion(h * w, ori_max_pe_len ** 2)` of the grid the frequencies are computed for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

RELEASE_METHODS = (
    "normal",
    "linear",
    "ntk-aware",
    "ntk-by-parts",
    "yarn",
    "ntk-aware-pro1",
    "ntk-aware-pro2",
)


@dataclass(frozen=True)
class RopeSpec:
    """The release's VisionRotaryEmbedding arguments (plus fitscale's attention scale)."""

    custom_freqs: str = "normal"  # one of RELEASE_METHODS
    decouple: bool = False  # rows from max_pe_len_h, columns from max_pe_len_w (else both from the max)
    online_rope: bool = False  # frequencies from each image's size instead of max_pe_len_h/w
    max_pe_len_h: int | None = None  # fixed frequencies: grid rows (the sampling script's n_patch_h)
    max_pe_len_w: int | None = None  # fixed frequencies: grid columns
    ori_max_pe_len: int = 16  # L0, the training grid edge
    theta: float = 10000.0
    attn_scale: bool = False

    def __post_init__(self) -> None:
        if self.custom_freqs not in RELEASE_METHODS:
            raise ValueError(f"custom_freqs {self.custom_freqs!r} is not one of {RELEASE_METHODS}")


def find_correction_factor(
    num_rotations: float, dim: int, base: float, max_position_embeddings: int
) -> float:
    return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def find_correction_range(low_rot: float, high_rot: float, dim: int, base: float, max_pe: int) -> tuple:
    low = math.floor(find_correction_factor(low_rot, dim, base, max_pe))
    high = math.ceil(find_correction_factor(high_rot, dim, base, max_pe))
    return max(low, 0), min(high, dim - 1)


def linear_ramp_mask(low: float, high: float, n: int) -> list[float]:
    if low == high:
        high += 0.001
    return [min(max((i - low) / (high - low), 0.0), 1.0) for i in range(n)]


def get_1d_rope_freqs(
    custom_freqs: str, theta: float, dim: int, max_pe_len: int, ori_max_pe_len: int
) -> list:
    """The dim/2 frequencies of one axis of `dim` = head_dim/2 dims for a grid edge `max_pe_len`."""
    exponents = [i / dim for i in range(0, dim, 2)]
    freqs_base = [1.0 / theta**e for e in exponents]
    if custom_freqs == "normal":  # the release's __init__ branch that never calls get_1d_rope_freqs
        return freqs_base
    scale = max(max_pe_len / ori_max_pe_len, 1.0)
    freqs_linear = [1.0 / (scale * theta**e) for e in exponents]
    new_base = theta * scale ** (dim / (dim - 2))  # find_newbase_ntk
    freqs_ntk = [1.0 / new_base**e for e in exponents]
    if custom_freqs == "linear":
        return freqs_linear
    if custom_freqs in ("ntk-aware", "ntk-aware-pro1", "ntk-aware-pro2"):
        return freqs_ntk
    if custom_freqs == "ntk-by-parts":
        beta_0, beta_1, gamma_0, gamma_1 = 1.25, 0.75, 16, 2
        low, high = find_correction_range(beta_0, beta_1, dim, theta, ori_max_pe_len)
        mask = [1 - r for r in linear_ramp_mask(low, high, dim // 2)]
        freqs = [lin * (1 - m) + ntk * m for lin, ntk, m in zip(freqs_linear, freqs_ntk, mask)]
        low, high = find_correction_range(gamma_0, gamma_1, dim, theta, ori_max_pe_len)
        mask = [1 - r for r in linear_ramp_mask(low, high, dim // 2)]
        return [f * (1 - m) + b * m for f, b, m in zip(freqs, freqs_base, mask)]
    assert custom_freqs == "yarn"
    beta_fast, beta_slow = 32, 1
    low, high = find_correction_range(beta_fast, beta_slow, dim, theta, ori_max_pe_len)
    mask = [1 - r for r in linear_ramp_mask(low, high, dim // 2)]
    return [lin * (1 - m) + b * m for lin, b, m in zip(freqs_linear, freqs_base, mask)]


def get_mscale(scale: float) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * math.log(scale) + 1.0


def get_proportion(l_test: float, l_train: float) -> float:
    l_test = l_test * 2
    return 1.0 if l_test / l_train <= 1.0 else math.sqrt(math.log(l_test) / math.log(l_train))


def magnitude(spec: RopeSpec, h: int, w: int) -> float:
    """The factor on cos and sin for frequencies computed for an h x w grid."""
    ori = spec.ori_max_pe_len
    factor = 1.0
    if spec.custom_freqs == "yarn":
        factor = get_mscale(max(max(h, w) / ori, 1.0))
    elif spec.custom_freqs == "ntk-aware-pro1":
        factor = get_proportion(max(h, w), ori)
    elif spec.custom_freqs == "ntk-aware-pro2":
        factor = get_proportion(h * w, ori**2)
    if spec.attn_scale:
        factor *= get_proportion(h * w, ori**2)
    return factor


def image_cos_sin(
    spec: RopeSpec, head_dim: int, grid: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (N, head_dim) float64 for one image; `grid` is the release's (2, N) column, row."""
    dim = head_dim // 2
    h, w = size if spec.online_rope else (spec.max_pe_len_h, spec.max_pe_len_w)
    if spec.custom_freqs == "normal":  # needs no grid
        freqs_h = freqs_w = get_1d_rope_freqs("normal", spec.theta, dim, 0, spec.ori_max_pe_len)
    elif spec.decouple:
        freqs_h = get_1d_rope_freqs(spec.custom_freqs, spec.theta, dim, h, spec.ori_max_pe_len)
        freqs_w = get_1d_rope_freqs(spec.custom_freqs, spec.theta, dim, w, spec.ori_max_pe_len)
    else:
        freqs_h = freqs_w = get_1d_rope_freqs(
            spec.custom_freqs, spec.theta, dim, max(h, w), spec.ori_max_pe_len
        )
    freqs_h = torch.tensor(freqs_h, dtype=torch.float64).repeat_interleave(2)  # '... n -> ... (n r)', r=2
    freqs_w = torch.tensor(freqs_w, dtype=torch.float64).repeat_interleave(2)
    angles = torch.cat(
        [grid[1].double()[:, None] * freqs_h[None, :], grid[0].double()[:, None] * freqs_w[None, :]], dim=1
    )  # (N, head_dim): rows first
    factor = magnitude(spec, h, w) if spec.custom_freqs != "normal" or spec.attn_scale else 1.0
    return angles.cos() * factor, angles.sin() * factor


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1) -> (-x1, x0) on each adjacent pair of the last dim (release `rotate_half`)."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
