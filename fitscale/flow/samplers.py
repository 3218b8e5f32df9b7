"""ODE samplers for rectified flow: integrate dx/dt = v(x, t) from noise (t = 0) to data (t = 1).

The release's ODE mode (`fit/scheduler/transport/integrators.py`, class `ode`) hands its velocity
to torchdiffeq's `odeint` over the same time direction (t = 0 noise, t = 1 data, velocity
x_1 - x_0), so every torchdiffeq method it accepts is offered here by the same name:

- adaptive (`ADAPTIVE`: dopri5, the release's default with atol 1e-6 / rtol 1e-3, dopri8, bosh3,
  fehlberg2, adaptive_heun): `atol` / `rtol`, no step count;
- on a grid of `steps` steps (`FIXED_GRID`): euler and heun written out here (a few lines each),
  midpoint, rk4 (the 3/8 rule), heun2, heun3 and implicit_adams from torchdiffeq. The release's
  `--num-sampling-steps N` is N grid points, so N - 1 of our steps. torchdiffeq's explicit_adams
  is not offered: on the Gaussian flow it diverges, more with more steps (docs/sampling.md).

torchdiffeq is the well-kept implementation, installed with `pip install 'fitscale[sample]'`.
The methods with an error control (adaptive, and implicit Adams' corrector) are solved per image
(fitscale.flow.per_image), so an image does not depend on the batch it shares; the grid methods
are elementwise and need no care.

A velocity function takes (x, t) with x any tensor and t a 0-d float tensor, and returns dx/dt
with x's shape. Every sampler returns an `OdeResult` with the endpoint and the number of
velocity evaluations, the figure that matters for cost (one model forward each; two with
classifier-free guidance packed into one forward).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fitscale.models.layers import shift_time

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WRITTEN_OUT = ("euler", "heun")  # ours, elementwise; every other sampler is torchdiffeq's
ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_GRID = ("euler", "heun", "midpoint", "rk4", "heun2", "heun3", "implicit_adams")
SAMPLERS = (*FIXED_GRID, *ADAPTIVE)
# Methods whose result depends on atol / rtol: the adaptive ones and implicit Adams (its corrector).
TOLERANCE_METHODS = (*ADAPTIVE, "implicit_adams")


@dataclass
class OdeResult:
    """The state an ODE sampler reached (t = 1, or the last time asked for) and its velocity-evaluation
    count.
    """

    x: torch.Tensor  # the state at t = 1 (or at the last time asked for)
    evaluations: int  # calls of the velocity function


class CountedVelocity:
    """Counts velocity evaluations and keeps t a 0-d tensor on x's device, float32 (float64 for a
    float64 x)."""

    def __init__(self, velocity: VelocityFn):
        self.velocity, self.calls = velocity, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        self.calls += 1
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        t = torch.as_tensor(t, dtype=dtype, device=x.device).reshape(())
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
    fn = CountedVelocity(velocity)
    times = time_grid(steps, time_shift).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * fn(x, t)
    return OdeResult(x, fn.calls)


@torch.no_grad()
def heun(velocity: VelocityFn, x: torch.Tensor, steps: int, time_shift: float = 1.0) -> OdeResult:
    """Second order (explicit trapezoid): an Euler predictor, then the mean of both slopes."""
    fn = CountedVelocity(velocity)
    times = time_grid(steps, time_shift).tolist()
    for t, t_next in zip(times[:-1], times[1:]):
        h = t_next - t
        slope = fn(x, t)
        predicted = x + h * slope
        x = x + 0.5 * h * (slope + fn(predicted, t_next))
    return OdeResult(x, fn.calls)


def import_torchdiffeq():
    """The torchdiffeq module, or ImportError saying how to install it (`fitscale[sample]`) or which
    samplers need none.
    """
    try:
        import torchdiffeq
    except ImportError as error:
        raise ImportError(
            "the torchdiffeq samplers need torchdiffeq: pip install 'fitscale[sample]' (or pip install "
            "torchdiffeq); or pick --sampler euler / heun"
        ) from error
    return torchdiffeq


def shifted_rhs(
    velocity: VelocityFn, time_shift: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ODE in the unshifted time s for torchdiffeq: d x / ds = v(x, t(s)) dt/ds (t = s unshifted)."""
    if time_shift == 1.0:
        return lambda s, state: velocity(state, s)

    def rhs(s: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        # t = a s / (1 + (a - 1) s) => dt/ds = a / (1 + (a - 1) s)^2
        denominator = 1 + (time_shift - 1) * s
        return velocity(state, shift_time(s, time_shift)) * (time_shift / denominator**2)

    return rhs


@torch.no_grad()
def odeint_endpoint(
    velocity: VelocityFn,
    x: torch.Tensor,
    method: str,
    steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    time_shift: float = 1.0,
) -> OdeResult:
    """One torchdiffeq solve of x from t = 0 to 1: adaptive methods over [0, 1] (the shift as a
    change of variable), grid methods on `time_grid(steps, time_shift)`.

    An adaptive method's error norm covers all of x: call it on one image for per-image control.
    """
    torchdiffeq = import_torchdiffeq()
    fn = CountedVelocity(velocity)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if method in ADAPTIVE:
        rhs = shifted_rhs(fn, time_shift)
        span = torch.tensor([0.0, 1.0], dtype=dtype, device=x.device)
    else:
        rhs = lambda t, state: fn(state, t)
        span = time_grid(steps, time_shift).to(dtype=dtype, device=x.device)
    # One-element lists, as the release passes them: torchdiffeq then computes its error norm in
    # float64 (a 0-d tolerance would leave it in x's dtype), which moves dopri5's end by ~1e-4.
    trajectory = torchdiffeq.odeint(rhs, x, span, method=method, atol=[atol], rtol=[rtol])
    return OdeResult(trajectory[-1], fn.calls)


def dopri5(
    velocity: VelocityFn,
    x: torch.Tensor,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    time_shift: float = 1.0,
) -> OdeResult:
    """Adaptive Dormand-Prince 5(4) through torchdiffeq, with the release's default tolerances."""
    return odeint_endpoint(velocity, x, "dopri5", atol=atol, rtol=rtol, time_shift=time_shift)


def integrate(
    velocity: VelocityFn,
    x: torch.Tensor,
    sampler: str = "euler",
    steps: int = 50,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    time_shift: float = 1.0,
) -> OdeResult:
    """Integrate all of x from t = 0 to t = 1 with the named sampler (`steps`: grid methods only).

    An adaptive method controls one step size for all of x; for a batch of images use
    fitscale.flow.per_image.integrate_per_image instead.
    """
    if sampler == "euler":
        return euler(velocity, x, steps, time_shift)
    if sampler == "heun":
        return heun(velocity, x, steps, time_shift)
    if sampler in SAMPLERS:
        return odeint_endpoint(velocity, x, sampler, steps, atol, rtol, time_shift)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


__all__ = [
    "ADAPTIVE",
    "FIXED_GRID",
    "SAMPLERS",
    "TOLERANCE_METHODS",
    "WRITTEN_OUT",
    "CountedVelocity",
    "OdeResult",
    "dopri5",
    "euler",
    "heun",
    "integrate",
    "odeint_endpoint",
    "shifted_rhs",
    "time_grid",
]
