"""The trainer's own checkpointed state (progress counters, LR schedule) and the run-folder lock.

Model, optimizer and RNG adapters live in fitscale.checkpoint.stateful; the classes here are
the small `Stateful`s only the training loop knows about.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fitscale.locking import try_lock


class SchedulerState:
    """The learning-rate scheduler's position (identical on every rank)."""

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
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
        return asdict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():
            setattr(self, key, int(value))


class RunFolderInUseError(FileExistsError):
    """Another live process holds the run folder (a FileExistsError, so the CLI reports it in one line)."""


class RunLock:
    """An exclusive lock on the run folder, held by rank 0 for the whole run.

    Built on `flock`, which the kernel drops when its holder dies (even by SIGKILL), so the lock
    of a dead run is taken over without any cleanup, while a second live run is refused. The
    file names the holder for the error message.
    """

    FILE_NAME = ".lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        fd, holder = try_lock(self.path, json.dumps(info))
        if fd is None:
            raise RunFolderInUseError(
                f"run folder {str(self.path.parent)!r} is in use by a live run ({holder or 'unknown process'}); "
                "stop that run or choose another train.run_dir"
            )
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
