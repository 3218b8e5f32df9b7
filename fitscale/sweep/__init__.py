"""Scaling-law sweeps: a spec of sizes x budgets (or steps), launch, collect, fit and plot."""

from fitscale.lazy import lazy_exports

# Imported on first use, so that importing the package does not import torch.
_EXPORTS = {
    "PlannedRun": "spec",
    "SweepModel": "spec",
    "SweepSpec": "spec",
    "fit_optimal_size": "fit",
    "fit_power_law": "fit",
    "frontier": "fit",
    "isoflop_optimum": "fit",
    "load_spec": "spec",
    "plan_sweep": "spec",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
