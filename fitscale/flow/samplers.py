"""ODE samplers for rectified flow: integrate dx/dt = v(x, t) from noise (t = 0) to data (t = 1).

Fixed-step Euler and Heun are written out (a few lines each, and their step count is the cost a
user picks); the adaptive dopri5 of the release's evaluation (atol 1e-6, rtol 1e-3) comes from
torchdiffeq, the well-kept implementation, installed with `pip install 'fitscale[sample]'`.

A velocity function takes (x, t) with x any tensor and t a 0-d float tensor, and returns dx/dt
with x's shape. Every sampler returns an `OdeResult` with the endpoint and the number of
velocity evaluations, the figure that matters for cost (one model forward each; two with
classifier-free guidance packed into one forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fitscale.flow.path import shift_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SAMPLERS = ("euler", "heun", "dopri5")


@dataclass
class OdeResult:
    x: torch.Tensor  # the state at t = 1 (or at the last time asked for)
    evaluations: int  # calls of the velocity function


class _Counted:
    """Counts velocity evaluations and keeps t a 0-d float32 tensor on x's device."""

    def __init__(self, velocity: VelocityFn):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(())
        return self.velocity(x, t)


def time_grid(steps: int, time_shift: float = 1.0, t0: float = 0.0, t1: float = 1.0) -> torch.Tensor:
    """steps + 1 float64 times from t0 to t1, uniform before the optional time shift.

    A shift below 1 spends more steps near the noise end (the release's habit at high resolution).
    """
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    grid = shift_time(torch.linspace(t0, t1, steps + 1, dtype=torch.float64), time_shift)
    grid[0], grid[-1] = t0, t1  # exact ends whatever the rounding of the shift
    return grid


@torch.no_grad()
def euler(velocity: VelocityFn, x: torch.Tensor, steps: int, time_shift: float = 1.0) -> OdeResult:
    """First order: x <- x + h v(x, t)."""
    fn = _Counted(velocity)
    times = time_grid(steps, time_shift).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * fn(x, t)
    return OdeResult(x, fn.calls)


@torch.no_grad()
def heun(velocity: VelocityFn, x: torch.Tensor, steps: int, time_shift: float = 1.0) -> OdeResult:
    """Second order (explicit trapezoid): an Euler predictor, then the mean of both slopes."""
    fn = _Counted(velocity)
    times = time_grid(steps, time_shift).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        h = t_next - t
        slope = fn(x, t)
        predicted = x + h * slope
        x = x + 0.5 * h * (slope + fn(predicted, t_next))
    return OdeResult(x, fn.calls)


def import_torchdiffeq():
    try:
        import torchdiffeq
    except ImportError as error:
        raise ImportError(
            "the dopri5 sampler needs torchdiffeq: pip install 'fitscale[sample]' (or pip install torchdiffeq); "
            "or pick --sampler euler / heun"
        ) from error
    return torchdiffeq


@torch.no_grad()
def dopri5(
    velocity: VelocityFn,
    x: torch.Tensor,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    time_shift: float = 1.0,
) -> OdeResult:
    """Adaptive Dormand-Prince 5(4) through torchdiffeq, with the release's default tolerances.

    With a time shift the ODE is integrated in the unshifted time s, dx/ds = v(x, t(s)) dt/ds.
    """
    torchdiffeq = import_torchdiffeq()
    fn = _Counted(velocity)
    if time_shift == 1.0:
        rhs = lambda s, state: fn(state, s)
    else:

        def rhs(s: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
            # t = a s / (1 + (a - 1) s) => dt/ds = a / (1 + (a - 1) s)^2
            denominator = 1 + (time_shift - 1) * s
            return fn(state, shift_time(s, time_shift)) * (time_shift / denominator**2)

    span = torch.tensor([0.0, 1.0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    trajectory = torchdiffeq.odeint(rhs, x, span.to(x.device), method="dopri5", atol=atol, rtol=rtol)
    return OdeResult(trajectory[-1], fn.calls)


def integrate(
    velocity: VelocityFn,
    x: torch.Tensor,
    sampler: str = "euler",
    steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    time_shift: float = 1.0,
) -> OdeResult:
    """Integrate from t = 0 to t = 1 with the named sampler (`steps` is ignored by dopri5)."""
    if sampler == "euler":
        return euler(velocity, x, steps, time_shift)
    if sampler == "heun":
        return heun(velocity, x, steps, time_shift)
    if sampler == "dopri5":
        return dopri5(velocity, x, atol, rtol, time_shift)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


__all__ = ["SAMPLERS", "OdeResult", "dopri5", "euler", "heun", "integrate", "time_grid"]
