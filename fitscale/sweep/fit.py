"""Scaling-law fits: L(C) = a C^-b + c per model size and for the frontier, and isoFLOP optima.

- `fit_power_law`: nonlinear least squares (scipy) of L = a (C / C0)^-b + c, with C0 the geometric
  mean of the compute values so the problem is well conditioned; `a` is reported at C0 = 1.
- `isoflop_optimum`: at one budget, a parabola of L against ln N through the runs of that budget;
  its vertex is the compute-optimal parameter count N*(C).
- `fit_optimal_size`: ln N* = alpha ln C + ln k through the isoFLOP optima (N* proportional to C^alpha).
Intervals come from a residual bootstrap: refit on fitted values plus resampled residuals, which
works with the handful of points a sweep has (resampling the points would repeat them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class PowerLawFit:
    """L(C) = a C^-b + c with bootstrap percentile intervals (lower, upper) at `level`."""

    a: float
    b: float
    c: float
    b_interval: tuple[float, float]
    c_interval: tuple[float, float]
    points: int
    rmse: float
    level: float = 0.95

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        return self.a * np.asarray(compute, dtype=np.float64) ** (-self.b) + self.c

    def to_dict(self) -> dict:
        return asdict(self)


def _curve_fit_power_law(log_c: np.ndarray, loss: np.ndarray) -> np.ndarray:
    """(ln a', b, c) for L = exp(ln a') exp(-b x) + c, x = ln C - mean(ln C)."""
    from scipy.optimize import curve_fit

    model = lambda x, log_a, b, c: np.exp(log_a) * np.exp(-b * x) + c
    spread = max(float(loss.max() - loss.min()), 1e-12)
    start = (math.log(spread), 0.3, max(float(loss.min()) - spread * 0.1, 0.0))
    bounds = ([-50.0, 0.0, 0.0], [50.0, 5.0, float(loss.max())])
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
        raise ValueError(f"a power law with offset needs >= 3 (compute, loss) points, got {compute.size}")
    if (compute <= 0).any():
        raise ValueError("compute values must be positive")
    centre = float(np.log(compute).mean())
    x = np.log(compute) - centre
    log_a, b, c = _curve_fit_power_law(x, loss)
    fitted = np.exp(log_a) * np.exp(-b * x) + c
    residuals = loss - fitted
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        resampled = fitted + rng.choice(residuals, size=residuals.size, replace=True)
        try:
            samples.append(_curve_fit_power_law(x, resampled)[1:])
        except RuntimeError:  # a resample the optimiser cannot fit is skipped
            continue
    samples = np.asarray(samples) if samples else np.asarray([[b, c]])
    tail = (1 - level) / 2 * 100
    b_lo, b_hi = np.percentile(samples[:, 0], [tail, 100 - tail])
    c_lo, c_hi = np.percentile(samples[:, 1], [tail, 100 - tail])
    return PowerLawFit(
        a=float(np.exp(log_a + b * centre)),  # a (C/C0)^-b = a C0^b C^-b
        b=float(b),
        c=float(c),
        b_interval=(float(b_lo), float(b_hi)),
        c_interval=(float(c_lo), float(c_hi)),
        points=int(compute.size),
        rmse=float(np.sqrt(np.mean(residuals**2))),
        level=level,
    )


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
    """The compute-optimal size at one budget, with a bootstrap interval."""

    budget: float
    n_opt: float
    n_interval: tuple[float, float]
    loss_at_opt: float
    points: int
    bracketed: bool  # the vertex lies within the sizes tried (else it is an extrapolation)


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
        raise ValueError(f"an isoFLOP parabola needs >= 3 model sizes at budget {budget:g}, got {log_n.size}")
    vertex = _parabola_vertex(log_n, loss_arr)
    if vertex is None:
        return None
    coefficients = np.polyfit(log_n, loss_arr, 2)
    fitted = np.polyval(coefficients, log_n)
    residuals = loss_arr - fitted
    rng = np.random.default_rng(seed)
    vertices = [
        v
        for v in (
            _parabola_vertex(log_n, fitted + rng.choice(residuals, residuals.size)) for _ in range(bootstrap)
        )
        if v is not None
    ] or [vertex]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(vertices, [tail, 100 - tail])
    return IsoFlopOptimum(
        budget=float(budget),
        n_opt=float(np.exp(vertex)),
        n_interval=(float(np.exp(lo)), float(np.exp(hi))),
        loss_at_opt=float(np.polyval(coefficients, vertex)),
        points=int(log_n.size),
        bracketed=bool(log_n.min() <= vertex <= log_n.max()),
    )


@dataclass
class OptimalSizeFit:
    """N*(C) = k C^alpha through the isoFLOP optima, alpha with a bootstrap interval."""

    k: float
    alpha: float
    alpha_interval: tuple[float, float]
    points: int

    def predict(self, compute: np.ndarray | float) -> np.ndarray:
        return self.k * np.asarray(compute, dtype=np.float64) ** self.alpha


def fit_optimal_size(optima: list[IsoFlopOptimum], level: float = 0.95, seed: int = 0) -> OptimalSizeFit:
    """Least squares of ln N* on ln C; the interval draws each N* from its own bootstrap interval."""
    if len(optima) < 2:
        raise ValueError(f"fitting N*(C) needs isoFLOP optima at >= 2 budgets, got {len(optima)}")
    log_c = np.log([o.budget for o in optima])
    log_n = np.log([o.n_opt for o in optima])
    alpha, log_k = np.polyfit(log_c, log_n, 1)
    # Spread of each ln N* from its interval (a normal approximation of the bootstrap).
    z = 1.959963984540054 if level == 0.95 else _normal_quantile(0.5 + level / 2)
    sd = np.array([(math.log(o.n_interval[1]) - math.log(o.n_interval[0])) / (2 * z) for o in optima])
    rng = np.random.default_rng(seed)
    draws = [np.polyfit(log_c, log_n + rng.normal(0.0, sd + 1e-12), 1)[0] for _ in range(500)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(draws, [tail, 100 - tail])
    return OptimalSizeFit(
        k=float(np.exp(log_k)), alpha=float(alpha), alpha_interval=(float(lo), float(hi)), points=len(optima)
    )


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
]
