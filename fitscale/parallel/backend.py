"""`ParallelBackend`: what the Trainer asks of FSDP2 or DeepSpeed, behind one interface.

The Trainer owns the loop (data, loss, schedule, metrics, checkpoints) and calls its backend for
everything that differs between the two: building and wrapping the model and optimizer, the module
a forward goes through, gradient synchronisation across micro-batches, backward, clipping, the
optimizer step and the EMA. What a checkpoint holds of each backend is fitscale.checkpoint.parts's
(the checkpoint layer sits above this one). `build_backend(config, env)` picks the
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

from fitscale.flow.repa import attach_projector
from fitscale.flow.repa_encoder import encoder_dim
from fitscale.models import build_model
from fitscale.models.layers import FiTBlock
from fitscale.parallel.cuda_graphs import maybe_apply_cuda_graphs
from fitscale.parallel.deepspeed import build_deepspeed_engine, deepspeed_problems, global_grad_norm
from fitscale.parallel.deepspeed_ema import DeepSpeedEMA
from fitscale.parallel.ema import EMA
from fitscale.parallel.float8 import maybe_precompute_float8_scales
from fitscale.parallel.mesh import DistributedEnv, build_mesh
from fitscale.parallel.parallelize import parallelize
from fitscale.runtime.agree import all_ranks_agree, rank0_decides

InitialState = Callable[[], dict[str, torch.Tensor]]
log = logging.getLogger("fitscale.train")


class ParallelBackend:
    """One run's parallelism. Call order: `build_model`, `wrap_optimizer`, `build_ema`, then per
    step `set_gradient_sync` + `backward` for each micro-batch, `clip_gradients`, and `step` or
    `zero_grad`. Its checkpoint part is fitscale.checkpoint.parts.backend_part(backend)."""

    name = ""
    fixed_on_resume: dict[str, str] = {}
    """Config fields a resume may not change because this backend's checkpoints depend on them,
    each with the reason (fitscale.train.resume adds them to its own list)."""

    @classmethod
    def launch_problems(cls, config) -> list[str]:
        """What keeps RunConfig `config` from running on this backend here, each naming the fix ([]:
        nothing). Asked before any rank starts (fitscale.train.preflight): needs no process group."""
        return []

    def __init__(self, config, env: DistributedEnv):
        self.config = config  # the RunConfig
        self.env = env
        self.mesh = None
        self.model: torch.nn.Module | None = None
        self.float8_report = None  # parallelize's: which linears became float8

    def _new_model(self, changes: dict[str, Any]) -> torch.nn.Module:

        model = build_model(self.config.model.name, **{**dict(self.config.model.overrides), **changes})
        attach_training_heads(model, self.config)
        return model

    def build_model(self, initial_state: InitialState, **changes: Any) -> torch.nn.Module:
        """The parallelised model on `env.device`, holding the full state dict `initial_state()`
        returns (called on rank 0 only, or on every rank, as the backend needs). `changes` are
        ModelConfig fields that differ from the run's model section (the trainer passes none: it
        turns the model's own label dropout off and drops labels per image in the step)."""
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
        """Clip to `train.grad_clip` (or leave it to `step`, which clips inside) and return the true
        global L2 norm of the step's gradient before clipping, over every rank: not finite when any
        gradient is not, so the trainer skips the step before the weights change."""
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


class FSDPBackend(ParallelBackend):
    """torch FSDP2 (`fully_shard`) over the mesh of `parallel.sharding`; plain module on one process."""

    name = "fsdp"

    def build_model(self, initial_state: InitialState, **changes: Any) -> torch.nn.Module:
        """Built on the meta device, parallelised, materialised, then the initial weights built on
        rank 0 are broadcast (so they do not depend on the world size)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        cfg = self.config
        with torch.device("meta"):
            model = self._new_model(changes)
        self.mesh = build_mesh(cfg.parallel, self.env)
        # train.cuda_graphs: static shapes and the compile mode that replays graphs (fitscale/parallel/cuda_graphs.py)
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

        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        maybe_precompute_float8_scales(self.model, self.config.parallel, self.mesh is not None)
        return None

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def build_ema(self, cfg):

        return EMA(self.model, cfg)


class DeepSpeedBackend(ParallelBackend):
    """DeepSpeed ZeRO-2/3 (fitscale.parallel.deepspeed): the engine steps, clips and reduces.

    Forwards go through the engine (it counts micro-batches there); it clips inside its step, so
    `step` returns its measured norm. Weights, optimizer state and the EMA's partitions are in
    DeepSpeed's own files (fitscale.checkpoint.deepspeed), written before the DCP part is published.
    """

    name = "deepspeed"
    fixed_on_resume = {"parallel.zero_stage": "DeepSpeed lays out its checkpoint files per ZeRO stage"}

    @classmethod
    def launch_problems(cls, config) -> list[str]:
        """DeepSpeed must be installed (`fitscale.parallel.deepspeed.deepspeed_problems`)."""

        return deepspeed_problems(config)

    def __init__(self, config, env: DistributedEnv):
        super().__init__(config, env)
        self.engine = None

    def build_model(self, initial_state: InitialState, **changes: Any) -> torch.nn.Module:
        """Built in full on every rank (ZeRO partitions it when the engine is made), then parallelised
        without a mesh: activation checkpointing and compile before DeepSpeed wraps the model."""
        torch.manual_seed(self.config.train.seed)
        model = self._new_model(changes)
        model.load_state_dict(all_ranks_agree(initial_state))  # every rank reads train.init_from
        self.float8_report = parallelize(model, self.config.parallel, None, self.env.device, eager_hooks=True)
        if self.config.parallel.zero_stage == 3:
            from deepspeed.utils import set_z3_leaf_modules

            # ZeRO-3 gathers each block's parameters at once, as FSDP2 does, with hooks on the block
            # alone and none inside it (so a compiled block's forward holds no ZeRO hook).
            set_z3_leaf_modules(model, [FiTBlock])
        self.model = model.to(self.env.device)
        return self.model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> None:

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
        """The true global gradient norm (`fitscale.parallel.deepspeed.global_grad_norm`), measured
        before the step so that a non-finite gradient is skipped; DeepSpeed clips inside its step
        (its config carries the limit)."""

        return global_grad_norm(self.engine)

    def step(self, optimizer: torch.optim.Optimizer) -> float | None:
        self.engine.step()
        return float(self.engine.get_global_grad_norm() or 0.0)

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Discard the step's gradient everywhere DeepSpeed keeps it (a skipped step): the module's
        `.grad` (all `engine.zero_grad` clears) and the ZeRO optimizer's accumulated partitions, whose
        `zero_grad` also restarts ZeRO-3's micro-step count, so the next step copies its first
        micro-batch's gradient instead of adding it to this one (a NaN would otherwise stay)."""
        self.engine.zero_grad()
        self.engine.optimizer.zero_grad(set_to_none=True)

    def build_ema(self, cfg):

        return DeepSpeedEMA(self.engine, self.model, cfg)  # ZeRO's fp32 master partitions, averaged in place


def attach_training_heads(model: torch.nn.Module, config) -> None:
    """The heads that train with the model but are no part of the network: REPA's projector
    (`train.repa`, fitscale.flow.repa), attached before parallelisation so that it is sharded,
    optimised and checkpointed with the model."""
    repa = config.train.repa
    if repa.enabled:
        attach_projector(model, repa, encoder_dim(repa))


BACKENDS: dict[str, type[ParallelBackend]] = {"fsdp": FSDPBackend, "deepspeed": DeepSpeedBackend}


def build_backend(config, env: DistributedEnv) -> ParallelBackend:
    """The backend `config.parallel.backend` names (the config has already checked the name)."""
    return BACKENDS[config.parallel.backend](config, env)
