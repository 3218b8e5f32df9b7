"""The joint law L(N, D) = E + A / N^alpha + B / D^beta, and predictions of runs it never saw.

Hoffmann et al. (2022, "Training Compute-Optimal Large Language Models", approach 3) fit this
form to every run of a sweep: N the parameter count, D the training tokens (steps x images per
step x tokens per image). Here it is fitted by least squares on ln L (scipy `least_squares`) from
a grid of starting points, with N and D divided by their geometric means so the problem is well
conditioned. With it a run of any size and budget has a predicted loss, which is what
`fitscale sweep predict` prints and what `fitscale sweep fit` compares with held-out runs.

Intervals: a residual bootstrap in ln L (refits on fitted values plus resampled residuals) gives
the spread of the curve; a prediction interval for one new run adds the residual variance
RSS / (n - 5), since a new run's loss carries its own noise, at Student's t quantile for n - 5
degrees of freedom (the percentiles of a bootstrap of a dozen points are too narrow).
With no more points than parameters there is no interval (see `fitscale.sweep.fit.no_interval_note`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from fitscale.errors import UserError
from fitscale.sweep.fit import Interval, no_interval_note, percentile_interval

PARAMETERS = 5  # E, A, alpha, B, beta


def _log_loss(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """ln L for theta = (ln E, ln A', alpha, ln B', beta) and centred ln N, ln D."""
    log_e, log_a, alpha, log_b, beta = theta
    terms = np.stack([np.full_like(log_n, log_e), log_a - alpha * log_n, log_b - beta * log_d])
    return np.logaddexp.reduce(terms, axis=0)


def _jacobian(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """d ln L / d theta: the softmax weights of the three terms (times -ln N, -ln D for the exponents)."""
    log_e, log_a, alpha, log_b, beta = theta
    terms = np.stack([np.full_like(log_n, log_e), log_a - alpha * log_n, log_b - beta * log_d])
    weights = np.exp(terms - np.logaddexp.reduce(terms, axis=0))
    return np.stack([weights[0], weights[1], -weights[1] * log_n, weights[2], -weights[2] * log_d], axis=1)


def _fit(log_n, log_d, log_l, starts) -> np.ndarray:
    from scipy.optimize import least_squares

    lower = [-20.0, -30.0, 0.0, -30.0, 0.0]
    upper = [float(log_l.min()), 30.0, 3.0, 30.0, 3.0]
    best = None
    for start in starts:
        start = np.clip(start, np.add(lower, 1e-9), np.subtract(upper, 1e-9))
        result = least_squares(
            lambda theta: _log_loss(theta, log_n, log_d) - log_l,
            start,
            jac=lambda theta: _jacobian(theta, log_n, log_d),
            bounds=(lower, upper),
        )
        if best is None or result.cost < best.cost:
            best = result
    return best.x


@dataclass
class LossLawFit:
    """L(N, D) = E + A N^-alpha + B D^-beta with bootstrap intervals of alpha, beta and E (or None)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    alpha_interval: Interval
    beta_interval: Interval
    E_interval: Interval
    points: int
    rmse_log: float  # root mean square residual of ln L
    level: float = 0.95
    interval_note: str | None = None
    centre: tuple[float, float] = (0.0, 0.0)  # mean ln N, mean ln D of the fitted runs
    theta: np.ndarray | None = field(default=None, repr=False)
    samples: np.ndarray | None = field(default=None, repr=False)  # bootstrap theta, one per row
    residual_variance: float = 0.0  # RSS / (n - 5) of ln L

    def predict(self, parameters: float | np.ndarray, tokens: float | np.ndarray) -> np.ndarray:
        """The law's loss for N = `parameters` and D = `tokens` (arrays broadcast)."""
        log_n = np.log(np.asarray(parameters, dtype=np.float64)) - self.centre[0]
        log_d = np.log(np.asarray(tokens, dtype=np.float64)) - self.centre[1]
        return np.exp(_log_loss(self.theta, *np.broadcast_arrays(log_n, log_d)))

    def interval(self, parameters: float, tokens: float) -> Interval:
        """`level` prediction interval for the loss of one new run at (N, D); None without an interval.

        ln L +- t(n - 5) * sqrt(var_curve + s^2): the bootstrap variance of the fitted ln L there plus
        the residual variance s^2 = RSS / (n - 5) of one new run, at Student's t quantile.
        """
        if self.samples is None:
            return None
        log_n = np.array([math.log(parameters) - self.centre[0]])
        log_d = np.array([math.log(tokens) - self.centre[1]])
        curves = np.array([_log_loss(theta, log_n, log_d)[0] for theta in self.samples])
        centre = float(_log_loss(self.theta, log_n, log_d)[0])
        spread = math.sqrt(float(np.var(curves)) + self.residual_variance)
        half = _t_quantile(0.5 + self.level / 2, self.points - PARAMETERS) * spread
        return math.exp(centre - half), math.exp(centre + half)

    def to_dict(self) -> dict:
        """The fit as JSON-able data, without the raw parameter vector, samples and centre."""
        out = asdict(self)
        for key in ("theta", "samples", "centre"):
            del out[key]
        return out


def fit_loss_law(
    parameters: list[float] | np.ndarray,
    tokens: list[float] | np.ndarray,
    loss: list[float] | np.ndarray,
    bootstrap: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> LossLawFit:
    """Fit L(N, D) to runs of at least 2 sizes and 5 (N, D) points; see the module docstring."""
    n = np.asarray(parameters, dtype=np.float64)
    d = np.asarray(tokens, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    if not n.shape == d.shape == loss.shape or n.size < PARAMETERS:
        raise UserError(f"L(N, D) has {PARAMETERS} parameters and needs >= {PARAMETERS} runs, got {n.size}")
    if len(set(n.tolist())) < 2:
        raise UserError("L(N, D) needs runs of at least 2 model sizes")
    if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any():
        raise UserError("parameters, tokens and losses must be positive")
    centre = (float(np.log(n).mean()), float(np.log(d).mean()))
    log_n, log_d, log_l = np.log(n) - centre[0], np.log(d) - centre[1], np.log(loss)
    floor = float(loss.min())
    starts = [
        np.array([math.log(floor * e), math.log(floor * a), alpha, math.log(floor * b), beta])
        for e, a, b, alpha, beta in itertools.product(
            (0.3, 0.8), (0.3,), (0.3,), (0.2, 0.6, 1.2), (0.2, 0.6, 1.2)
        )
    ]
    theta = _fit(log_n, log_d, log_l, starts)
    residuals = log_l - _log_loss(theta, log_n, log_d)
    note = no_interval_note(int(n.size), PARAMETERS, "L = E + A N^-alpha + B D^-beta")
    fit = LossLawFit(
        E=float(math.exp(theta[0])),
        A=float(math.exp(theta[1] + theta[2] * centre[0])),  # A' (N/N0)^-alpha = A' N0^alpha N^-alpha
        alpha=float(theta[2]),
        B=float(math.exp(theta[3] + theta[4] * centre[1])),
        beta=float(theta[4]),
        alpha_interval=None,
        beta_interval=None,
        E_interval=None,
        points=int(n.size),
        rmse_log=float(np.sqrt(np.mean(residuals**2))),
        level=level,
        interval_note=note,
        centre=centre,
        theta=theta,
    )
    if note:
        return fit
    fitted = log_l - residuals
    rng = np.random.default_rng(seed)
    fit.samples = np.asarray(
        [
            _fit(log_n, log_d, fitted + rng.choice(residuals, residuals.size), [theta])
            for _ in range(bootstrap)
        ]
    )
    fit.residual_variance = float(np.sum(residuals**2) / (n.size - PARAMETERS))
    for name, column in (("alpha", 2), ("beta", 4)):
        lo, hi = percentile_interval(fit.samples[:, column], level)
        setattr(fit, f"{name}_interval", (float(lo), float(hi)))
    lo, hi = percentile_interval(np.exp(fit.samples[:, 0]), level)
    fit.E_interval = (float(lo), float(hi))
    return fit


def _t_quantile(p: float, dof: int) -> float:
    from scipy.stats import t as student_t

    return float(student_t.ppf(p, dof))


__all__ = ["LossLawFit", "fit_loss_law"]
