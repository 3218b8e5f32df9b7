"""Scaling-law fits: L(C) = a C^-b + c per model size and for the frontier, and isoFLOP optima.

- `fit_power_law`: nonlinear least squares (scipy) of L = a (C / C0)^-b + c, with C0 the geometric
  mean of the compute values so the problem is well conditioned; `a` is reported at C0 = 1.
- `isoflop_optimum`: at one budget, a parabola of L against ln N through the runs of that budget;
  its vertex is the compute-optimal parameter count N*(C).
- `fit_optimal_size`: ln N* = alpha ln C + ln k through the isoFLOP optima (N* proportional to C^alpha).
Intervals come from a residual bootstrap: refit on fitted values plus resampled residuals, which
works with the handful of points a sweep has (resampling the points would repeat them). A fit
with no more points than parameters passes through every point: its residuals are zero and say
nothing about the noise, so it has no interval (`None`, with the reason in `interval_note`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from fitscale.errors import UserError

Interval = tuple[float, float] | None


def no_interval_note(points: int, parameters: int, what: str) -> str | None:
    """Why a fit of `parameters` parameters to `points` points has no interval (None when it has one)."""
    if points > parameters:
        return None
    return (
        f"no interval: {points} points for the {parameters} parameters of {what}, so the fit passes "
        "through every point (as near as its bounds allow) and its residuals say nothing about the noise; "
        "add runs"
    )


def percentile_interval(values: np.ndarray, level: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The central `level` percentile range of bootstrap draws along `axis`."""
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail], axis=axis)
    return lo, hi


@dataclass
class PowerLawFit:
    """L(C) = a C^-b + c with bootstrap percentile intervals (lower, upper) at `level`, or None."""

    a: float
    b: float
    c: float
    b_interval: Interval
    c_interval: Interval
    points: int
    rmse: float
    level: float = 0.95
    interval_note: str | None = None
    samples: np.ndarray | None = field(default=None, repr=False)  # bootstrap (a, b, c), one per row

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        """L(C) = a C^-b + c at training compute `compute` (FLOPs); the same shape as `compute`."""
        return self.a * np.asarray(compute, dtype=np.float64) ** (-self.b) + self.c

    def band(self, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Pointwise `level` interval of the fitted curve at `compute` (None without an interval)."""
        if self.samples is None:
            return None
        compute = np.asarray(compute, dtype=np.float64)
        curves = self.samples[:, :1] * compute[None, :] ** (-self.samples[:, 1:2]) + self.samples[:, 2:3]
        return percentile_interval(curves, self.level)

    def to_dict(self) -> dict:
        """The fit as JSON-able data, without the bootstrap samples."""
        out = asdict(self)
        del out["samples"]
        return out


def _curve_fit_power_law(log_c: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """(ln a', b, c) for L = exp(ln a') exp(-b x) + c, x = ln C - mean(ln C)."""
    from scipy.optimize import OptimizeWarning, curve_fit

    model = lambda x, log_a, b, c: np.exp(log_a) * np.exp(-b * x) + c
    spread = max(float(loss.max() - loss.min()), 1e-12)
    start = (math.log(spread), 0.3, max(float(loss.min()) - spread * 0.1, 0.0))
    bounds = ([-50.0, 0.0, 0.0], [50.0, 5.0, float(loss.max())])
    with warnings.catch_warnings():  # an exact fit (3 points) has no covariance, which is not used
        warnings.simplefilter("ignore", OptimizeWarning)
        params, _ = curve_fit(model, log_c, loss, p0=start, bounds=bounds, maxfev=20000)
    return params


def fit_power_law(
    compute: np.ndarray | list[float],
    loss: np.ndarray | list[float],
    bootstrap: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> PowerLawFit:
    """Fit L = a C^-b + c (b, c >= 0) to at least 3 points; see the module docstring."""
    compute = np.asarray(compute, dtype=np.float64)
    loss = np.asarray(loss, dtype=np.float64)
    if compute.shape != loss.shape or compute.size < 3:
        raise UserError(f"a power law with offset needs >= 3 (compute, loss) points, got {compute.size}")
    if (compute <= 0).any():
        raise UserError("compute values must be positive")
    centre = float(np.log(compute).mean())
    x = np.log(compute) - centre
    log_a, b, c = _curve_fit_power_law(x, loss)
    fitted = np.exp(log_a) * np.exp(-b * x) + c
    residuals = loss - fitted
    note = no_interval_note(int(compute.size), 3, "L = a C^-b + c")
    fit = PowerLawFit(
        a=float(np.exp(log_a + b * centre)),  # a (C/C0)^-b = a C0^b C^-b
        b=float(b),
        c=float(c),
        b_interval=None,
        c_interval=None,
        points=int(compute.size),
        rmse=float(np.sqrt(np.mean(residuals**2))),
        level=level,
        interval_note=note,
    )
    if note:
        return fit
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        resampled = fitted + rng.choice(residuals, size=residuals.size, replace=True)
        try:
            sample = _curve_fit_power_law(x, resampled)
        except RuntimeError:  # a resample the optimiser cannot fit is skipped
            continue
        samples.append((math.exp(sample[0] + sample[1] * centre), sample[1], sample[2]))
    fit.samples = np.asarray(samples) if samples else np.asarray([[fit.a, fit.b, fit.c]])
    b_lo, b_hi = percentile_interval(fit.samples[:, 1], level)
    c_lo, c_hi = percentile_interval(fit.samples[:, 2], level)
    fit.b_interval, fit.c_interval = (float(b_lo), float(b_hi)), (float(c_lo), float(c_hi))
    return fit


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Per compute value the lowest loss; then only points that beat every cheaper one."""
    best: dict[float, float] = {}
    for compute, loss in points:
        best[compute] = min(loss, best.get(compute, math.inf))
    out, floor = [], math.inf
    for compute in sorted(best):
        if best[compute] < floor:
            out.append((compute, best[compute]))
            floor = best[compute]
    return out


def _parabola_vertex(log_n: np.ndarray, loss: np.ndarray) -> float | None:
    curvature, slope, _ = np.polyfit(log_n, loss, 2)
    if curvature <= 0:
        return None  # no minimum: the budget's sizes do not bracket the optimum
    return float(-slope / (2 * curvature))


@dataclass
class IsoFlopOptimum:
    """The compute-optimal size at one budget, with a bootstrap interval (None with 3 sizes)."""

    budget: float
    n_opt: float
    n_interval: Interval
    loss_at_opt: float
    points: int
    bracketed: bool  # the vertex lies within the sizes tried (else it is an extrapolation)
    n_range: tuple[float, float] = (0.0, 0.0)  # the smallest and largest size tried
    interval_note: str | None = None


def isoflop_optimum(
    budget: float,
    parameters: list[float],
    loss: list[float],
    bootstrap: int = 200,
    level: float = 0.95,
    seed: int = 0,
) -> IsoFlopOptimum | None:
    """The parabola vertex of L against ln N at one budget; None when the curve has no minimum."""
    log_n = np.log(np.asarray(parameters, dtype=np.float64))
    loss_arr = np.asarray(loss, dtype=np.float64)
    if log_n.size < 3:
        raise UserError(f"an isoFLOP parabola needs >= 3 model sizes at budget {budget:g}, got {log_n.size}")
    vertex = _parabola_vertex(log_n, loss_arr)
    if vertex is None:
        return None
    coefficients = np.polyfit(log_n, loss_arr, 2)
    note = no_interval_note(int(log_n.size), 3, "the parabola L(ln N)")
    interval = None
    if not note:
        fitted = np.polyval(coefficients, log_n)
        residuals = loss_arr - fitted
        rng = np.random.default_rng(seed)
        vertices = [
            v
            for v in (
                _parabola_vertex(log_n, fitted + rng.choice(residuals, residuals.size))
                for _ in range(bootstrap)
            )
            if v is not None
        ] or [vertex]
        lo, hi = percentile_interval(np.asarray(vertices), level)
        interval = (float(np.exp(lo)), float(np.exp(hi)))
    return IsoFlopOptimum(
        budget=float(budget),
        n_opt=float(np.exp(vertex)),
        n_interval=interval,
        loss_at_opt=float(np.polyval(coefficients, vertex)),
        points=int(log_n.size),
        bracketed=bool(log_n.min() <= vertex <= log_n.max()),
        n_range=(float(np.exp(log_n.min())), float(np.exp(log_n.max()))),
        interval_note=note,
    )


@dataclass
class OptimalSizeFit:
    """N*(C) = k C^alpha through the isoFLOP optima, alpha with an interval (or None and why)."""

    k: float
    alpha: float
    alpha_interval: Interval
    points: int
    level: float = 0.95
    interval_note: str | None = None
    samples: np.ndarray | None = field(default=None, repr=False)  # draws of (alpha, ln k)

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        """N*(C) = k C^alpha: the compute-optimal parameter count at `compute` FLOPs."""
        return self.k * np.asarray(compute, dtype=np.float64) ** self.alpha

    def band(self, compute: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Pointwise (lower, upper) interval of N*(C) at `level` from the bootstrap draws, or None
        without draws.
        """
        if self.samples is None:
            return None
        log_c = np.log(np.asarray(compute, dtype=np.float64))
        lines = np.exp(self.samples[:, :1] * log_c[None, :] + self.samples[:, 1:2])
        return percentile_interval(lines, self.level)

    def to_dict(self) -> dict:
        """The fit as JSON-able data, without the bootstrap samples."""
        out = asdict(self)
        del out["samples"]
        return out


def fit_optimal_size(optima: list[IsoFlopOptimum], level: float = 0.95, seed: int = 0) -> OptimalSizeFit:
    """Least squares of ln N* on ln C.

    The interval draws each ln N* from a normal with the spread of its own bootstrap interval when
    every optimum has one; else, with more than 2 optima, from the regression's residual spread
    (t distribution); with 2 optima there is none.
    """
    if len(optima) < 2:
        raise UserError(f"fitting N*(C) needs isoFLOP optima at >= 2 budgets, got {len(optima)}")
    log_c = np.log([o.budget for o in optima])
    log_n = np.log([o.n_opt for o in optima])
    alpha, log_k = np.polyfit(log_c, log_n, 1)
    fit = OptimalSizeFit(k=float(np.exp(log_k)), alpha=float(alpha), alpha_interval=None, points=len(optima))
    fit.level = level
    z = _normal_quantile(0.5 + level / 2)
    if all(o.n_interval for o in optima):
        sd = np.array([(math.log(o.n_interval[1]) - math.log(o.n_interval[0])) / (2 * z) for o in optima])
    elif len(optima) > 2:
        from scipy.stats import t as student_t

        residuals = log_n - np.polyval([alpha, log_k], log_c)
        # The residual spread, widened to a t quantile for its len - 2 degrees of freedom.
        scale = float(np.sqrt(np.sum(residuals**2) / (len(optima) - 2)))
        sd = np.full(len(optima), scale * float(student_t.ppf(0.5 + level / 2, len(optima) - 2)) / z)
    else:
        fit.interval_note = (
            "no interval: 2 optima for the 2 parameters of N* = k C^alpha and the optima have no "
            "intervals of their own (3 sizes per budget); add sizes or budgets"
        )
        return fit
    rng = np.random.default_rng(seed)
    fit.samples = np.asarray([np.polyfit(log_c, log_n + rng.normal(0.0, sd + 1e-12), 1) for _ in range(500)])
    lo, hi = percentile_interval(fit.samples[:, 0], level)
    fit.alpha_interval = (float(lo), float(hi))
    return fit


def _normal_quantile(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


__all__ = [
    "IsoFlopOptimum",
    "OptimalSizeFit",
    "PowerLawFit",
    "fit_optimal_size",
    "fit_power_law",
    "frontier",
    "isoflop_optimum",
    "no_interval_note",
    "percentile_interval",
]
