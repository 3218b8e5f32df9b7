"""The straight path from noise (t = 0) to data (t = 1) and its velocity.

FiTv2 counts time the other way round from many diffusion codebases: t = 1 is the clean
image. Keeping these formulas in one place keeps training and sampling in agreement; the time shift
(`shift_time`) is the model's own map, defined beside its timestep embedder in `fitscale.models.layers`.
"""

from __future__ import annotations

import torch

from fitscale.models.layers import shift_time  # noqa: F401  (the model's time map, re-exported for the flow)


def interpolate(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t x_1 + (1 - t) x_0; `t` broadcasts against the tokens (e.g. shape (T, 1))."""
    return t * data + (1 - t) * noise


def velocity_target(data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt along the straight path: x_1 - x_0."""
    return data - noise
