"""What a checkpoint holds: `Stateful` adapters for the model, the optimizer, RNGs and per-rank state.

torch.distributed.checkpoint (DCP) treats every entry of the state it saves as global: a plain
tensor or Python value stored under the same name on several ranks is assumed replicated and
written once. That is right for model weights (DTensor shards are told apart by their offsets)
and for the step number, and silently wrong for RNG states and data-loader positions, which
differ per rank. `PerRankState` marks such entries; the CheckpointManager stores each rank's
value under its own name and gives it back to the same rank, or, when the world size changed,
hands every saved rank's value to a resharding rule.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class ModelState(Stateful):
    """The model's weights, sharded as the model is (FSDP2 DTensors reshard on load)."""

    def __init__(self, model: nn.Module, strict: bool = True):
        self.model = model
        self.options = StateDictOptions(strict=strict)

    def state_dict(self) -> dict[str, Any]:
        """The model's state dict through DCP's `get_model_state_dict` (sharded DTensors under FSDP)."""
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict into the model through DCP's `set_model_state_dict`."""
        set_model_state_dict(self.model, state_dict, options=self.options)


class OptimizerState(Stateful):
    """AdamW moments and step counts keyed by parameter name (not by position), sharded like the weights."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model = model
        self.optimizer = optimizer
        self.options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer state keyed by parameter name through DCP's `get_optimizer_state_dict`."""
        return get_optimizer_state_dict(self.model, self.optimizer, options=self.options)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an optimizer state keyed by parameter name through DCP's `set_optimizer_state_dict`."""
        set_optimizer_state_dict(self.model, self.optimizer, state_dict, options=self.options)


class RNGState(Stateful):
    """Python, NumPy, torch CPU and (when present) the current CUDA device's generator of this rank.

    Wrap it in `PerRankState`: each rank draws its own noise. When the world size changes, ranks
    that existed before get their own streams back and new ranks get a fresh stream derived from
    the saved rank-0 state and their rank, so the resumed run is still deterministic.
    """

    def state_dict(self) -> dict[str, Any]:
        """This process's Python, NumPy, torch CPU and (when initialised) CUDA generator states."""
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {
                "name": name,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "position": int(position),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generator states of `state_dict` (CUDA's only where CUDA is available)."""
        random.setstate(state_dict["python"])
        numpy_state = state_dict["numpy"]
        np.random.set_state(
            (
                numpy_state["name"],
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["position"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state(state_dict["cuda"])

    def load_resharded(self, saved: dict[int, dict[str, Any]], rank: int, world_size: int) -> None:
        """Restore on another world size: a rank that saved its state gets it back; a new rank is seeded
        from a hash of the lowest saved rank's torch state and its own rank, so it differs from every
        other rank and is the same on every resume.
        """
        if rank in saved:
            self.load_state_dict(saved[rank])
            return
        anchor = saved[min(saved)]["torch"].numpy().tobytes()
        digest = hashlib.sha256(anchor + rank.to_bytes(8, "little")).digest()
        seed = int.from_bytes(digest[:8], "little") % 2**63
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


ReshardRule = Callable[[dict[int, Any], int, int], None]


class PerRankState:
    """A Stateful whose value differs per rank (RNG, data-loader position); see the module docstring.

    `reshard(saved_by_rank, rank, world_size)` restores this rank's state when the checkpoint was
    written by a different number of ranks; without it the wrapped object's own `load_resharded`
    is used, and loading on another world size fails with a clear error if neither exists.
    """

    def __init__(self, stateful: Stateful, reshard: ReshardRule | None = None):
        self.stateful = stateful
        self.reshard = reshard or getattr(stateful, "load_resharded", None)

    def serialized(self) -> bytes:
        """This rank's state as one opaque value, so DCP neither flattens nor deduplicates it."""
        buffer = io.BytesIO()
        torch.save(self.stateful.state_dict(), buffer)
        return buffer.getvalue()

    @staticmethod
    def deserialize(data: bytes) -> Any:
        """One rank's saved value from `serialized` bytes, read weights-only (no arbitrary objects)."""
        # weights_only: tensors, numbers, strings and containers; never arbitrary objects.
        return torch.load(io.BytesIO(data), weights_only=True)

    def restore(self, saved: dict[int, bytes], rank: int, world_size: int, saved_world_size: int) -> None:
        """Load this rank's entry, or reshard when the world size changed."""
        if saved_world_size == world_size:
            self.stateful.load_state_dict(self.deserialize(saved[rank]))
            return
        assert self.reshard is not None  # checked by the manager before any collective
        self.reshard({r: self.deserialize(value) for r, value in saved.items()}, rank, world_size)
