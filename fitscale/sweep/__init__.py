"""Scaling-law sweeps: a spec of sizes x budgets (or steps) x learning rates, launch, collect, fit, predict."""

from fitscale.lazy import lazy_exports

# Imported on first use, so that importing the package does not import torch.
_EXPORTS = {
    "HeldOutRun": "spec",
    "LRAxis": "spec",
    "LossLawFit": "law",
    "PlannedRun": "spec",
    "SweepModel": "spec",
    "SweepSpec": "spec",
    "fit_loss_law": "law",
    "fit_optimal_size": "fit",
    "fit_power_law": "fit",
    "frontier": "fit",
    "isoflop_optimum": "fit",
    "load_spec": "spec",
    "plan_sweep": "spec",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
