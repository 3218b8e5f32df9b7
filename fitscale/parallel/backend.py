"""`ParallelBackend`: what the Trainer asks of FSDP2 or DeepSpeed, behind one interface.

The Trainer owns the loop (data, loss, schedule, metrics, checkpoints) and calls its backend for
everything that differs between the two: building and wrapping the model and optimizer, the module
a forward goes through, gradient synchronisation across micro-batches, backward, clipping, the
optimizer step, the EMA, and what a checkpoint holds. `build_backend(config, env)` picks the
implementation by `parallel.backend` (a registry, `BACKENDS`).

Both reduce gradients as an average over ranks while the loss of a micro-batch is already this
rank's share of the step's global mean (fitscale.flow.loss), so `backward` scales it by the world
size to make their average the sum.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from fitscale.parallel.agree import all_ranks_agree, rank0_decides
from fitscale.parallel.mesh import DistributedEnv, build_mesh
from fitscale.parallel.parallelize import parallelize

InitialState = Callable[[], dict[str, torch.Tensor]]
log = logging.getLogger("fitscale.train")


class ParallelBackend:
    """One run's parallelism. Call order: `build_model`, `wrap_optimizer`, `build_ema`, then per
    step `set_gradient_sync` + `backward` for each micro-batch, `clip_gradients`, and `step` or
    `zero_grad`; `checkpoint_state`, `save` and `load` around checkpoints."""

    name = ""
    fixed_on_resume: dict[str, str] = {}
    """Config fields a resume may not change because this backend's checkpoints depend on them,
    each with the reason (fitscale.train.resume adds them to its own list)."""

    def __init__(self, config, env: DistributedEnv):
        self.config = config  # the RunConfig
        self.env = env
        self.mesh = None
        self.model: torch.nn.Module | None = None
        self.float8_report = None  # parallelize's: which linears became float8

    def _new_model(self) -> torch.nn.Module:
        from fitscale.models import build_model

        model = build_model(self.config.model.name, **dict(self.config.model.overrides))
        attach_training_heads(model, self.config)
        return model

    def build_model(self, initial_state: InitialState) -> torch.nn.Module:
        """The parallelised model on `env.device`, holding the full state dict `initial_state()`
        returns (called on rank 0 only, or on every rank, as the backend needs)."""
        raise NotImplementedError

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Take over `optimizer` (built on the model's parameters) where the backend steps it itself."""

    @property
    def forward_module(self) -> torch.nn.Module:
        """The module training and validation forwards go through."""
        return self.model

    def set_gradient_sync(self, last: bool) -> None:
        """Reduce gradients over ranks on this micro-batch's backward only when `last` (accumulation)."""
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of `loss`, this rank's share of the global mean loss (a scalar)."""
        raise NotImplementedError

    def _scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.env.world_size if self.env.world_size > 1 else loss

    def clip_gradients(self) -> float:
        """Clip to `train.grad_clip` and return the global L2 norm before clipping (0.0 when the
        backend clips inside `step`, which then returns the norm)."""
        raise NotImplementedError

    def step(self, optimizer: torch.optim.Optimizer) -> float | None:
        """One optimizer step, gradients cleared after; the gradient norm when measured here, else None."""
        raise NotImplementedError

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this step's gradients without stepping (a non-finite step)."""
        raise NotImplementedError

    def build_ema(self, cfg):
        """The EMA of the trainable weights (`optim.ema`), with `update`, `swap_into` and state."""
        raise NotImplementedError

    def checkpoint_state(self, optimizer: torch.optim.Optimizer, ema) -> dict[str, Any]:
        """The Statefuls this backend keeps in the DCP checkpoint (weights, optimizer, EMA)."""
        return {}

    def save(self, step: int, force: bool, checkpoints, ema) -> bool:
        """Write what the backend keeps outside the DCP checkpoint when a save is due (collective);
        True when it wrote, so the CheckpointManager must publish step `step` too."""
        return False

    def load(self, step: int, ema) -> None:
        """Load what `save` wrote for step `step` (collective), before the DCP part."""


class FSDPBackend(ParallelBackend):
    """torch FSDP2 (`fully_shard`) over the mesh of `parallel.sharding`; plain module on one process."""

    name = "fsdp"

    def build_model(self, initial_state: InitialState) -> torch.nn.Module:
        """Built on the meta device, parallelised, materialised, then the initial weights built on
        rank 0 are broadcast (so they do not depend on the world size)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from fitscale.train.cuda_graphs import maybe_apply_cuda_graphs

        cfg = self.config
        with torch.device("meta"):
            model = self._new_model()
        self.mesh = build_mesh(cfg.parallel, self.env)
        # train.cuda_graphs: static shapes and the compile mode that replays graphs (fitscale/train/cuda_graphs.py)
        compile_mode = maybe_apply_cuda_graphs(model, cfg, self.env.device, self.env.world_size)
        self.float8_report = parallelize(
            model, cfg.parallel, self.mesh, self.env.device, compile_mode=compile_mode
        )
        if self.env.is_main and cfg.parallel.float8 != "none":
            log.info(self.float8_report.summary())
        model.to_empty(device=self.env.device)
        with warnings.catch_warnings():
            # DTensor warns that random init on a CPU mesh may differ from a GPU mesh's: these values are
            # replaced by the broadcast initial weights just below.
            warnings.filterwarnings("ignore", "DTensor random operators", UserWarning)
            model.init_weights()  # also fills buffers
        if self.mesh is None:
            model.load_state_dict(initial_state())
        else:
            held: dict[str, dict[str, torch.Tensor]] = {}  # rank 0's copy; only success or error is shared

            def build_on_rank0() -> None:
                held["state"] = initial_state()

            rank0_decides(build_on_rank0)  # a failed read of train.init_from fails every rank, none waits
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(model, held.get("state", {}), options=options)
        self.model = model
        return model

    def set_gradient_sync(self, last: bool) -> None:
        if self.mesh is not None:
            self.model.set_requires_gradient_sync(last)

    def backward(self, loss: torch.Tensor) -> None:
        self._scaled(loss).backward()

    def clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.config.train.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def step(self, optimizer: torch.optim.Optimizer) -> float | None:
        from fitscale.parallel.float8 import maybe_precompute_float8_scales

        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        maybe_precompute_float8_scales(self.model, self.config.parallel, self.mesh is not None)
        return None

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def build_ema(self, cfg):
        from fitscale.train.ema import EMA

        return EMA(self.model, cfg)

    def checkpoint_state(self, optimizer: torch.optim.Optimizer, ema) -> dict[str, Any]:
        from fitscale.checkpoint.stateful import ModelState, OptimizerState

        state: dict[str, Any] = {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, optimizer),
        }
        if ema is not None:
            state["ema"] = ema
        return state


class DeepSpeedBackend(ParallelBackend):
    """DeepSpeed ZeRO-2/3 (fitscale.parallel.deepspeed): the engine steps, clips and reduces.

    Forwards go through the engine (it counts micro-batches there); it clips inside its step, so
    `step` returns its measured norm. Weights, optimizer state and the EMA's partitions are in
    DeepSpeed's own files (fitscale.checkpoint.deepspeed), written before the DCP part is published.
    """

    name = "deepspeed"
    fixed_on_resume = {"parallel.zero_stage": "DeepSpeed lays out its checkpoint files per ZeRO stage"}

    def __init__(self, config, env: DistributedEnv):
        super().__init__(config, env)
        self.engine = None

    def build_model(self, initial_state: InitialState) -> torch.nn.Module:
        """Built in full on every rank (ZeRO partitions it when the engine is made), then parallelised
        without a mesh: activation checkpointing and compile before DeepSpeed wraps the model."""
        torch.manual_seed(self.config.train.seed)
        model = self._new_model()
        model.load_state_dict(all_ranks_agree(initial_state))  # every rank reads train.init_from
        self.float8_report = parallelize(model, self.config.parallel, None, self.env.device)
        if self.config.parallel.zero_stage == 3:
            from deepspeed.utils import set_z3_leaf_modules

            from fitscale.models.layers import FiTBlock

            # ZeRO-3 gathers each block's parameters at once, as FSDP2 does, with hooks on the block
            # alone and none inside it (so a compiled block's forward holds no ZeRO hook).
            set_z3_leaf_modules(model, [FiTBlock])
        self.model = model.to(self.env.device)
        return self.model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        from fitscale.parallel.deepspeed import build_deepspeed_engine

        cfg = self.config
        self.engine = build_deepspeed_engine(self.model, optimizer, cfg.parallel, cfg.train, self.env)

    @property
    def forward_module(self) -> torch.nn.Module:
        # DeepSpeed counts micro-batches in its engine's forward; bypassing it drops all but the last.
        # Validation goes through it too: it applies the bf16 autocast of training's forward.
        return self.engine

    def set_gradient_sync(self, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(self._scaled(loss), scale_wrt_gas=False)

    def clip_gradients(self) -> float:
        return 0.0  # DeepSpeed clips inside engine.step() (its config carries the limit)

    def step(self, optimizer: torch.optim.Optimizer) -> float | None:
        self.engine.step()
        return float(self.engine.get_global_grad_norm() or 0.0)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self.engine.zero_grad()

    def build_ema(self, cfg):
        from fitscale.parallel.deepspeed_ema import DeepSpeedEMA

        return DeepSpeedEMA(self.engine, self.model, cfg)  # ZeRO's fp32 master partitions, averaged in place

    def _all_agree(self, flag: bool) -> bool:
        if self.env.world_size == 1:
            return flag
        value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=self.env.device)
        dist.all_reduce(value)
        return int(value) == 0

    def save(self, step: int, force: bool, checkpoints, ema) -> bool:
        from fitscale.checkpoint.deepspeed import save_deepspeed_state

        interval = self.config.checkpoint.interval
        flags = [force, checkpoints.save_requested, interval > 0 and step % interval == 0]
        if self._all_agree(not any(flags)):
            return False
        if checkpoints.written_already(step):  # raises, before any file, for a step this run did not write
            return True
        # Written before the manager publishes step-N, so a visible step always has this part.
        save_deepspeed_state(self.engine, self.config.train.run_dir, step, checkpoints.complete_steps(), ema)
        return True

    def load(self, step: int, ema) -> None:
        from fitscale.checkpoint.deepspeed import load_deepspeed_state

        load_deepspeed_state(self.engine, self.config.train.run_dir, step, ema)


def attach_training_heads(model: torch.nn.Module, config) -> None:
    """The heads that train with the model but are no part of the network: REPA's projector
    (`train.repa`, fitscale.flow.repa), attached before parallelisation so that it is sharded,
    optimised and checkpointed with the model."""
    repa = config.train.repa
    if repa.enabled:
        from fitscale.flow.repa import attach_projector
        from fitscale.flow.repa_encoder import encoder_dim

        attach_projector(model, repa, encoder_dim(repa))


BACKENDS: dict[str, type[ParallelBackend]] = {"fsdp": FSDPBackend, "deepspeed": DeepSpeedBackend}


def build_backend(config, env: DistributedEnv) -> ParallelBackend:
    """The backend `config.parallel.backend` names (the config has already checked the name)."""
    return BACKENDS[config.parallel.backend](config, env)
