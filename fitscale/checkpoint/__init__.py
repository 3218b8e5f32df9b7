"""Sharded checkpoints with torch.distributed.checkpoint: atomic publish, retention, resume, export."""

from fitscale.checkpoint.manager import CheckpointManager, CheckpointMismatchError
from fitscale.checkpoint.stateful import (
    ModelState,
    OptimizerState,
    PerRankState,
    RNGState,
    clean_parameter_name,
)

__all__ = [
    "CheckpointManager",
    "CheckpointMismatchError",
    "ModelState",
    "OptimizerState",
    "PerRankState",
    "RNGState",
    "clean_parameter_name",
]
