"""Scaling-law sweeps: a spec of sizes x budgets (or steps) x learning rates, launch, collect, fit, predict."""

from fitscale.sweep.fit import fit_optimal_size, fit_power_law, frontier, isoflop_optimum
from fitscale.sweep.law import LossLawFit, fit_loss_law
from fitscale.sweep.spec import HeldOutRun, LRAxis, PlannedRun, SweepModel, SweepSpec, load_spec, plan_sweep

__all__ = [
    "HeldOutRun",
    "LRAxis",
    "LossLawFit",
    "PlannedRun",
    "SweepModel",
    "SweepSpec",
    "fit_loss_law",
    "fit_optimal_size",
    "fit_power_law",
    "frontier",
    "isoflop_optimum",
    "load_spec",
    "plan_sweep",
]
