"""What a checkpoint holds of the parallel backend: in the DCP checkpoint (FSDP2), or in files of its
own written before the DCP part is published (DeepSpeed's ZeRO partitions and the EMA's).

The backend (fitscale.parallel.backend) trains; this module, one layer above it, saves and loads.
`backend_part(backend)` is the part of the backend's kind (a registry keyed like `BACKENDS`); the
Trainer asks it for the Statefuls of the DCP checkpoint (`state`), to write its own files when a
save is due (`save`), and to load them before the DCP part (`load`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from fitscale.checkpoint.deepspeed import load_deepspeed_state, save_deepspeed_state
from fitscale.checkpoint.stateful import ModelState, OptimizerState


class BackendPart:
    """The checkpoint part of a backend that keeps everything in the DCP checkpoint (nothing of its own)."""

    def __init__(self, backend, run_dir) -> None:
        self.backend = backend
        self.run_dir = run_dir  # the run folder (`train.run_dir`): DeepSpeed's files go under it

    def state(self, optimizer: torch.optim.Optimizer, ema) -> dict[str, Any]:
        """The Statefuls this backend keeps in the DCP checkpoint (weights, optimizer, EMA)."""
        return {}

    def save(self, step: int, force: bool, checkpoints, ema) -> bool:
        """Write what the backend keeps outside the DCP checkpoint when a save is due (collective);
        True when it wrote, so the CheckpointManager must publish step `step` too."""
        return False

    def load(self, step: int, ema) -> None:
        """Load what `save` wrote for step `step` (collective), before the DCP part."""


class DCPPart(BackendPart):
    """FSDP2 (or one process): weights, optimizer state and EMA as DCP Statefuls, resharded on load."""

    def state(self, optimizer: torch.optim.Optimizer, ema) -> dict[str, Any]:
        """`model`, `optimizer` and (when enabled) `ema` Statefuls of the backend's model."""

        model = self.backend.model
        state: dict[str, Any] = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
        if ema is not None:
            state["ema"] = ema
        return state


class DeepSpeedPart(BackendPart):
    """DeepSpeed: weights, optimizer state and the EMA's partitions in DeepSpeed's own files
    (fitscale.checkpoint.deepspeed), written before the DCP part is published."""

    def _all_agree(self, flag: bool) -> bool:
        env = self.backend.env
        if env.world_size == 1:
            return flag
        value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=env.device)
        dist.all_reduce(value)
        return int(value) == 0

    def save(self, step: int, force: bool, checkpoints, ema) -> bool:
        """Write step `step`'s DeepSpeed files when any rank is due to save (forced, a signal asked, or on
        the interval: `checkpoints.due`); True when the step must be published."""

        if self._all_agree(not checkpoints.due(step, force or checkpoints.save_requested)):
            return False
        if checkpoints.written_already(step):  # raises, before any file, for a step this run did not write
            return True
        # Written before the manager publishes step-N, so a visible step always has this part.
        save_deepspeed_state(self.backend.engine, self.run_dir, step, checkpoints.complete_steps(), ema)
        return True

    def load(self, step: int, ema) -> None:
        """Load step `step`'s DeepSpeed files into the engine and the EMA (any world size, same ZeRO stage)."""

        load_deepspeed_state(self.backend.engine, self.run_dir, step, ema)


PARTS: dict[str, type[BackendPart]] = {"fsdp": DCPPart, "deepspeed": DeepSpeedPart}


def backend_part(backend, run_dir) -> BackendPart:
    """The checkpoint part of `backend` (a fitscale.parallel.backend.ParallelBackend, by its registry
    name) for the run folder `run_dir`."""
    return PARTS[backend.name](backend, run_dir)
