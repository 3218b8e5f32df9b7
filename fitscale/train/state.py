"""The trainer's own checkpointed state (progress counters, LR schedule); the run-folder lock is
fitscale.train.lock (re-exported here).

Model, optimizer and RNG adapters live in fitscale.checkpoint.stateful; the classes here are
the small `Stateful`s only the training loop knows about.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fitscale.train.lock import RunFolderInUseError, RunLock

__all__ = ["Progress", "RunFolderInUseError", "RunLock", "SchedulerState", "seed_rank"]


class SchedulerState:
    """The learning-rate scheduler's position (identical on every rank)."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        """The learning-rate scheduler's state dict."""
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the learning-rate scheduler's state."""
        self.scheduler.load_state_dict(state_dict)


def seed_rank(seed: int, rank: int) -> None:
    """Seed this rank's global RNGs (label dropout and anything else stochastic in the model)."""
    value = (seed * 1_000_003 + rank * 7_919) % (2**63)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % (2**32))


@dataclass
class Progress:
    """Counters of the run; `step` is the number of optimizer steps taken (skipped ones included)."""

    step: int = 0
    images: int = 0
    real_tokens: int = 0
    nonfinite_total: int = 0
    nonfinite_consecutive: int = 0

    def state_dict(self) -> dict[str, Any]:
        """The counters as a dict of ints."""
        return asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters from `state_dict`."""
        for key, value in state_dict.items():
            setattr(self, key, int(value))
