"""Sharded checkpoints with torch.distributed.checkpoint: atomic publish, retention, resume, export."""

from fitscale.lazy import lazy_exports

# Imported on first use, so that importing the package does not import torch.
_EXPORTS = {
    "CheckpointManager": "manager",
    "CheckpointConflictError": "manager",
    "CheckpointMismatchError": "manager",
    "ModelState": "stateful",
    "OptimizerState": "stateful",
    "PerRankState": "stateful",
    "RNGState": "stateful",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
