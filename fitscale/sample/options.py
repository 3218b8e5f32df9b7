"""How to sample: the solver and its settings, guidance, seed, batch size, compute dtype, and
the paper's training-free RoPE extrapolation methods as ModelConfig overrides."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitscale.flow.samplers import SAMPLERS

# The paper's training-free extrapolation methods as ModelConfig fields ("Vision" = decoupled axes).
EXTRAPOLATIONS = {
    "none": {"rope_method": "none", "rope_decoupled": False},
    "linear": {"rope_method": "linear", "rope_decoupled": False},
    "ntk": {"rope_method": "ntk", "rope_decoupled": False},
    "yarn": {"rope_method": "yarn", "rope_decoupled": False},
    "vision-ntk": {"rope_method": "ntk", "rope_decoupled": True},
    "vision-yarn": {"rope_method": "yarn", "rope_decoupled": True},
}


def extrapolation_overrides(method: str | None, attn_scale: bool = False) -> dict:
    """ModelConfig overrides for an extrapolation method (per-image frequencies, so every size in
    a packed batch gets its own); None keeps the model's own RoPE. Raises ValueError for an
    unknown name, listing the known ones."""
    if method is None:
        return {"rope_attn_scale": True} if attn_scale else {}
    if method not in EXTRAPOLATIONS:
        raise ValueError(f"--extrapolation {method!r}: choose one of {', '.join(EXTRAPOLATIONS)}")
    return {
        **EXTRAPOLATIONS[method],
        "rope_attn_scale": attn_scale,
        "rope_per_image": True,
        "rope_target_grid": None,
    }


@dataclass
class SamplingOptions:
    """How to integrate: sampler, steps or tolerances, guidance, seed and batch size.

    Raises ValueError naming the command-line flag of a bad value.
    """

    sampler: str = "euler"  # euler | heun | dopri5
    steps: int = 50  # fixed-step samplers only
    atol: float = 1e-6  # dopri5
    rtol: float = 1e-3  # dopri5
    time_shift: float = 1.0  # sample on a shifted time grid (< 1: more steps near noise)
    cfg_scale: float = 1.0  # 1 = no guidance
    guidance_channels: int | None = None  # 3: the release's first-3-channels guidance
    seed: int = 0
    token_budget: int = 16384  # tokens per forward (guidance doubles a batch's tokens)
    autocast: str = "auto"  # auto (bf16 on CUDA), bf16 or fp32

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        if self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be >= 1")
        if self.cfg_scale < 0:
            raise ValueError(f"--cfg {self.cfg_scale}: the guidance scale must be >= 0")
        if self.autocast not in ("auto", "bf16", "fp32"):
            raise ValueError(f"--dtype {self.autocast!r}: choose auto, bf16 or fp32")


def autocast_dtype(option: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an `autocast` option on `device` (None: full precision)."""
    if option == "bf16" or (option == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
