"""The straight path from noise (t = 0) to data (t = 1) and its velocity.

FiTv2 counts time the other way round from many diffusion codebases: t = 1 is the clean
image. Keeping these three formulas in one place keeps training and sampling in agreement.
"""

from __future__ import annotations

import torch


def interpolate(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = t x_1 + (1 - t) x_0; `t` broadcasts against the tokens (e.g. shape (T, 1))."""
    return t * data + (1 - t) * noise


def velocity_target(data: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_t / dt along the straight path: x_1 - x_0."""
    return data - noise


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """t <- s t / (1 + (s - 1) t), clamped to [0, 1]; s = 1 is the identity.

    The release's formula: s > 1 moves timesteps towards the data end, s < 1 towards noise
    (useful at high resolution, where more of the signal survives a given noise level).
    """
    if shift == 1.0:
        return t
    return (shift * t / (1 + (shift - 1) * t)).clamp(0.0, 1.0)
