"""Scaling-law sweeps: a spec of sizes x budgets (or steps), launch, collect, fit and plot."""

from fitscale.sweep.fit import fit_optimal_size, fit_power_law, frontier, isoflop_optimum
from fitscale.sweep.spec import PlannedRun, SweepModel, SweepSpec, load_spec, plan_sweep

__all__ = [
    "PlannedRun",
    "SweepModel",
    "SweepSpec",
    "fit_optimal_size",
    "fit_power_law",
    "frontier",
    "isoflop_optimum",
    "load_spec",
    "plan_sweep",
]
