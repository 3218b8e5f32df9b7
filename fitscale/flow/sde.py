"""SDE samplers for rectified flow: Euler-Maruyama and stochastic Heun from noise (t = 0) to data.

The release's SDE mode (`fit/scheduler/transport/transport.py`, `Sampler.sample_sde`, and
`integrators.py`, class `sde`) integrates, for the linear path x_t = t x_1 + (1 - t) x_0,

    dx = [v(x, t) + g(t) score(x, t)] dt + sqrt(2 g(t)) dW,    score = (t v - x) / ((1 - t)^2 + t (1 - t))

which keeps every marginal p_t of the flow (a Langevin correction added to the probability-flow
ODE, strength g). Time runs in the same direction as our ODE (t = 0 noise, t = 1 data) and the
velocity has the same sign (x_1 - x_0), so the release's function is taken unchanged:

- `steps` uniform steps over [t0, t1], t1 = 1 - last_step_size (1 without a last step); the
  release's `num_steps` N is our steps + 1 (its linspace has N points).
- Euler-Maruyama: x <- x + drift dt + sqrt(2 g) sqrt(dt) w. Heun: noise first,
  xhat = x + sqrt(2 g) sqrt(dt) w, then the trapezoid on the drift from xhat (t and t + dt).
- the last step from t1: `mean` x + drift h, `tweedie` x / t + (1 - t)^2 / t score,
  `euler` x + v h, or `none` (the SDE then runs to t = 1). h = last_step_size.
- diffusion forms g(t) of `path.py` `ICPlan.compute_diffusion`; `diffusion_norm` scales them.

Where the release has no finite function we choose one: its `SBDM` form g = (1 - t) / t is
infinite at t = 0, where its velocity-model transport starts (every sample comes out NaN), so
ours starts SBDM at t0 = `SBDM_START` (1e-3, the start the release's transport uses for paths
that are singular at t = 0).

The noise of each step comes from a caller's function of the step index, so a caller can draw
each image's noise from its own seed (fitscale.sample.plan), independent of the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fitscale.flow.samplers import CountedVelocity, OdeResult, VelocityFn
from fitscale.models.layers import shift_time

SDE_SAMPLERS = ("euler", "heun")
DIFFUSION_FORMS = ("constant", "sbdm", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("mean", "tweedie", "euler", "none")
SBDM_START = 1e-3

NoiseFn = Callable[[int], torch.Tensor]  # step index -> standard normal noise shaped like x


def diffusion_coefficient(form: str, t: float, norm: float = 1.0) -> float:
    """g(t) of the release's `ICPlan.compute_diffusion` (linear path); `form` lower-case."""
    if form == "constant":
        return norm
    if form == "sbdm":  # norm * (alpha'/alpha sigma^2 - sigma sigma'), as the release writes it
        return norm * ((1 - t) ** 2 / t + (1 - t))
    if form in ("sigma", "linear"):  # sigma_t = 1 - t on the linear path
        return norm * (1 - t)
    if form == "decreasing":
        return 0.25 * (norm * math.cos(math.pi * t) + 1) ** 2
    if form == "increasing-decreasing":
        return norm * math.sin(math.pi * t) ** 2
    raise ValueError(f"unknown diffusion form {form!r}; choose one of {', '.join(DIFFUSION_FORMS)}")


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """grad log p_t(x) from the velocity on the linear path (release `get_score_from_velocity`)."""
    variance = (1 - t) ** 2 + t * (1 - t)
    return (t * v - x) / variance


def sde_interval(diffusion_form: str, last_step: str, last_step_size: float) -> tuple[float, float]:
    """(t0, t1) of the stochastic part (release `Transport.check_interval`, velocity model)."""
    t0 = SBDM_START if diffusion_form == "sbdm" else 0.0
    t1 = 1.0 if last_step == "none" else 1.0 - last_step_size
    return t0, t1


@torch.no_grad()
def sample_sde(
    velocity: VelocityFn,
    x: torch.Tensor,
    noise: NoiseFn,
    steps: int,
    sampler: str = "euler",
    diffusion_form: str = "sigma",
    diffusion_norm: float = 1.0,
    last_step: str = "mean",
    last_step_size: float = 0.04,
    time_shift: float = 1.0,
) -> OdeResult:
    """Integrate the release's SDE from noise `x` (at t0) and take its last step.

    `noise(k)` gives step k's standard normal draw, shaped like x (k = 0 .. steps - 1).
    Velocity evaluations: steps (euler) or 2 steps (heun), plus one for a last step.
    `time_shift` != 1 spaces the steps as `shift_time` does the ODE's (1: the release's grid).
    """
    if sampler not in SDE_SAMPLERS:
        raise ValueError(f"unknown SDE sampler {sampler!r}; choose one of {', '.join(SDE_SAMPLERS)}")
    fn = CountedVelocity(velocity)
    t0, t1 = sde_interval(diffusion_form, last_step, last_step_size)
    unit = shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), time_shift)
    times = (t0 + (t1 - t0) * unit).tolist()
    times[0], times[-1] = t0, t1

    def drift(state: torch.Tensor, t: float) -> torch.Tensor:
        v = fn(state, t)
        g = diffusion_coefficient(diffusion_form, t, diffusion_norm)
        return v + g * score_from_velocity(v, state, t)

    for k, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
        dt = t_next - t
        kick = math.sqrt(2 * diffusion_coefficient(diffusion_form, t, diffusion_norm) * dt) * noise(k).to(x)
        if sampler == "euler":
            x = x + drift(x, t) * dt + kick
        else:
            x = x + kick
            k1 = drift(x, t)
            k2 = drift(x + dt * k1, t_next)
            x = x + 0.5 * dt * (k1 + k2)
    h = last_step_size
    if last_step == "mean":
        x = x + drift(x, t1) * h
    elif last_step == "tweedie":
        x = x / t1 + (1 - t1) ** 2 / t1 * score_from_velocity(fn(x, t1), x, t1)
    elif last_step == "euler":
        x = x + fn(x, t1) * h
    elif last_step != "none":
        raise ValueError(f"unknown last step {last_step!r}; choose one of {', '.join(LAST_STEPS)}")
    return OdeResult(x, fn.calls)


__all__ = [
    "DIFFUSION_FORMS",
    "LAST_STEPS",
    "SBDM_START",
    "SDE_SAMPLERS",
    "diffusion_coefficient",
    "sample_sde",
    "score_from_velocity",
    "sde_interval",
]
