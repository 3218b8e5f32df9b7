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
    """t <- s t / (1 + (s - 1) t), capped at 1; s = 1 is the identity. Maps [0, 1] onto itself.

    The release's `time_shifting` (fit/model/fit_model.py, `torch.clamp(..., max=1.0)`), the
    timestep shift of SD3 (Esser et al. 2024, section 5.3.2): s > 1 moves times towards the data
    end, s < 1 towards noise (useful at high resolution, where more of the signal survives a given
    noise level). One map, applied where each `time_shift` field says:
    - `model.time_shift`: to the model's input time before its timestep embedding (the release's);
    - `train.flow.time_shift`: to the training timesteps after they are drawn;
    - `fitscale sample --time-shift`: to the sampler's time grid.
    """
    if shift == 1.0:
        return t
    return torch.clamp(shift * t / (1 + (shift - 1) * t), max=1.0)
