"""Timestep samplers: logit-normal (the release) or uniform, then the optional time shift."""

from __future__ import annotations

import torch

from fitscale.models.layers import shift_time


def sample_timesteps(
    count: int,
    sampler: str = "logit_normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    time_shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(count,) float32 timesteps in [0, 1] on the generator's device (CPU by default)."""
    device = generator.device if generator is not None else torch.device("cpu")
    if sampler == "logit_normal":
        u = torch.randn(count, generator=generator, device=device) * logit_std + logit_mean
        t = torch.sigmoid(u)
    elif sampler == "uniform":
        t = torch.rand(count, generator=generator, device=device)
    else:
        raise ValueError(f"unknown timestep sampler {sampler!r}; use logit_normal or uniform")
    return shift_time(t, time_shift)
