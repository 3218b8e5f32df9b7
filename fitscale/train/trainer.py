"""The training loop: one object that builds the run, takes steps and keeps them safe.

`Trainer(config).train()` is the whole run: join the process group, lock the run folder, build
the model on the meta device and parallelise it (FSDP2 or DeepSpeed), load the newest complete
checkpoint or initialise, then loop over optimizer steps with gradient accumulation over
micro-batches, clipping, a skip for non-finite steps, EMA, metrics and checkpoints. The loss is
the rectified-flow loss of fitscale.flow, normalised by the step's global image count so that
neither the rank count nor the micro-batch split changes a step.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fitscale.config import RunConfig, to_yaml
from fitscale.config.errors import ConfigError
from fitscale.flow import flow_loss, per_image_noise
from fitscale.parallel import (
    DistributedEnv,
    apply_ac,
    apply_compile,
    apply_fsdp,
    build_mesh,
    init_distributed,
)
from fitscale.train.state import Progress, RunLock, SchedulerState, seed_rank

log = logging.getLogger("fitscale.train")

TIMESTEP_BUCKETS = 4  # loss reported for t in [0, .25), [.25, .5), [.5, .75), [.75, 1]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient; the run stops without saving."""


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    skipped: bool
    images: int
    real_tokens: int
    tokens: int
    bucket_loss: list[float]
    seqlens: list[int]


class Trainer:
    """Builds everything a run needs from a RunConfig; `train()` runs it to `train.steps`."""

    def __init__(self, config: RunConfig, env: DistributedEnv | None = None):
        self.config = config
        self.env = env or init_distributed(config.train.device)
        self.run_dir = Path(config.train.run_dir)
        self.lock = RunLock(self.run_dir)
        self._acquire_lock()
        self.model_config = config.model_config()
        self.progress = Progress()
        self.mesh = None
        self.engine = None  # the DeepSpeed engine when parallel.backend == deepspeed
        self.model = self._build_model()
        self.optimizer, self.scheduler = self._build_optimizer()
        self.ema = self._build_ema()
        self.loader = self._build_loader()
        self.checkpoints = self._build_checkpoint_manager()
        self.metrics = self._build_metrics()

    # ---- building ---------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        """Rank 0 takes the run-folder lock; every rank learns whether it succeeded."""
        error: Exception | None = None
        if self.env.is_main:
            try:
                self.lock.acquire()
            except Exception as exc:  # RunFolderInUseError, OSError
                error = exc
        ok = self._all_agree(error is None)
        if error is not None:
            raise error
        if not ok:
            raise SystemExit(2)  # rank 0 reports the reason

    def _all_agree(self, flag: bool) -> bool:
        if self.env.world_size == 1:
            return flag
        value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=self.comm_device)
        dist.all_reduce(value)
        return int(value) == 0

    @property
    def comm_device(self) -> torch.device:
        return self.env.device

    def _full_initial_state(self) -> dict[str, torch.Tensor]:
        """The initial weights, built on the CPU from the run seed (or a released checkpoint).

        Built in full on rank 0 and broadcast, so initial weights do not depend on the world size.
        """
        from fitscale.models import build_model
        from fitscale.models.official import load_official_checkpoint

        torch.manual_seed(self.config.train.seed)
        model = build_model(self.config.model.name, **dict(self.config.model.overrides))
        if self.config.train.init_from:
            load_official_checkpoint(model, self.config.train.init_from)
        return model.state_dict()

    def _build_model(self) -> torch.nn.Module:
        from fitscale.models import build_model

        cfg = self.config
        if cfg.parallel.backend == "deepspeed":
            return self._build_deepspeed_model()
        with torch.device("meta"):
            model = build_model(cfg.model.name, **dict(cfg.model.overrides))
        apply_ac(model, cfg.parallel.activation_checkpointing, cfg.parallel.ac_every)
        apply_compile(model, cfg.parallel.compile)
        self.mesh = build_mesh(cfg.parallel, self.env)
        if self.mesh is not None:
            apply_fsdp(model, self.mesh, cfg.parallel, self.env.device)
        model.to_empty(device=self.env.device)
        model.init_weights()  # also fills buffers; the weights are replaced just below
        self._load_initial_weights(model)
        self._apply_trainable(model)
        seed_rank(cfg.train.seed, self.env.rank)
        return model

    def _load_initial_weights(self, model: torch.nn.Module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.mesh is None:
            model.load_state_dict(self._full_initial_state())
            return
        full = self._full_initial_state() if self.env.is_main else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full, options=options)

    def _apply_trainable(self, model: torch.nn.Module) -> None:
        from fitscale.models.partial import NAMED_SETS, apply_trainable

        patterns = list(self.config.train.trainable)
        if not patterns:
            return
        spec = patterns[0] if len(patterns) == 1 and patterns[0] in NAMED_SETS else patterns
        try:
            count = apply_trainable(_unwrapped_names_view(model), spec)
        except ValueError as error:
            raise ConfigError(f"train.trainable: {error}") from error
        log.info("training %d of the model's parameter values; the rest stay frozen", count)

    def _build_deepspeed_model(self) -> torch.nn.Module:
        from fitscale.models import build_model

        cfg = self.config
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model.name, **dict(cfg.model.overrides))
        model.load_state_dict(self._full_initial_state())
        apply_ac(model, cfg.parallel.activation_checkpointing, cfg.parallel.ac_every)
        self._apply_trainable(model)
        seed_rank(cfg.train.seed, self.env.rank)
        return model.to(self.env.device)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def _build_optimizer(self):
        from fitscale.train.optim import build_optimizer
        from fitscale.train.schedule import build_lr_scheduler

        cfg = self.config
        optimizer = build_optimizer(self.model, cfg.optim, global_batch_size=self.global_batch_size())
        if cfg.parallel.backend == "deepspeed":
            from fitscale.parallel.deepspeed import build_deepspeed_engine

            self.engine = build_deepspeed_engine(self.model, optimizer, cfg.parallel, cfg.train, self.env)
        scheduler = build_lr_scheduler(optimizer, cfg.optim.schedule, total_steps=cfg.train.steps)
        return optimizer, scheduler

    def global_batch_size(self) -> int | None:
        """Images per optimizer step across all ranks, when the data section fixes it."""
        value = getattr(self.config.data, "global_batch_size", None) or getattr(
            self.config.data, "batch_size", None
        )
        return int(value) if value else None

    def _build_ema(self):
        if not self.config.optim.ema.enabled:
            return None
        if self.config.parallel.backend == "deepspeed":
            raise ConfigError(
                "optim.ema.enabled=true is not supported with parallel.backend=deepspeed "
                "(ZeRO partitions the weights outside torch); set optim.ema.enabled=false or use parallel.backend=fsdp"
            )
        from fitscale.train.ema import EMA

        return EMA(self.model, self.config.optim.ema)

    def _build_loader(self):
        from fitscale.data import build_loader

        return build_loader(self.config.data, self.env.rank, self.env.world_size)

    def _build_checkpoint_manager(self):
        from fitscale.checkpoint import CheckpointManager

        return CheckpointManager(self.run_dir, self.config.checkpoint)

    def _build_metrics(self):
        from fitscale.train.metrics import MetricsLogger

        return MetricsLogger(self.run_dir, self.config.log, self.env.rank)

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds, as Statefuls keyed by name."""
        from fitscale.checkpoint.stateful import ModelState, OptimizerState, PerRankState, RNGState

        state: dict[str, Any] = {
            "lr_scheduler": SchedulerState(self.scheduler),
            "data": self.loader,
            "rng": PerRankState(RNGState()),
            "progress": self.progress,
        }
        if self.engine is None:  # DeepSpeed keeps weights and optimizer in its own files
            state["model"] = ModelState(self.model)
            state["optimizer"] = OptimizerState(self.model, self.optimizer)
        if self.ema is not None:
            state["ema"] = self.ema
        return state

    # ---- resuming ---------------------------------------------------------------------------

    def maybe_resume(self) -> int | None:
        """Load the checkpoint `train.resume` asks for; returns its step, or None for a fresh start."""
        resume = self.config.train.resume
        latest = self.checkpoints.latest_step()
        if resume == "never":
            if latest is not None:
                raise ConfigError(
                    f"train.resume=never but {self.run_dir} already holds checkpoint step {latest}; "
                    "set train.resume=auto to continue it or choose another train.run_dir"
                )
            return None
        step = latest if resume == "auto" else int(resume)
        if step is None:
            return None
        if self.engine is not None:
            from fitscale.parallel.deepspeed import load_deepspeed_state

            load_deepspeed_state(self.engine, self.run_dir, step)
        self.checkpoints.load(step, self.state())
        log.info("resumed from step %d", step)
        return step

    def save(self, step: int, force: bool = False) -> None:
        if self.engine is not None:
            from fitscale.parallel.deepspeed import save_deepspeed_state

            save_deepspeed_state(self.engine, self.run_dir, step)
        self.checkpoints.maybe_save(step, self.state(), force=force)

    # ---- one step ---------------------------------------------------------------------------

    def train_step(self, step_batch) -> StepStats:
        """Forward/backward every micro-batch of this rank, then one optimizer step (or a skip)."""
        cfg = self.config
        step = self.progress.step
        micro_batches = step_batch.micro_batches
        counts = self._global_counts(micro_batches)
        global_images = step_batch.global_num_images or int(counts[0])
        self.model.train()
        local_loss = torch.zeros((), dtype=torch.float64, device=self.env.device)
        bucket_sum = torch.zeros(TIMESTEP_BUCKETS, dtype=torch.float64, device=self.env.device)
        bucket_count = torch.zeros(TIMESTEP_BUCKETS, dtype=torch.float64, device=self.env.device)
        seqlens: list[int] = []
        for index, micro in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            timesteps, noise = per_image_noise(micro, cfg.train.seed, step, cfg.train.flow)
            lengths = (micro.cu_seqlens[1:] - micro.cu_seqlens[:-1])[: micro.num_images].tolist()
            seqlens.extend(lengths)
            batch = micro.to(self.env.device)
            timesteps = timesteps.to(self.env.device, non_blocking=True)
            noise = noise.to(self.env.device, non_blocking=True)
            self._set_gradient_sync(last)
            out = flow_loss(self.model, batch, timesteps, noise, global_images, cfg.train.flow)
            self._backward(out.loss, last)
            local_loss += out.loss.detach().double()
            bucket = (out.timesteps * TIMESTEP_BUCKETS).long().clamp(0, TIMESTEP_BUCKETS - 1)
            bucket_sum.index_add_(0, bucket, out.per_image.double())
            bucket_count.index_add_(0, bucket, torch.ones_like(out.per_image, dtype=torch.float64))
        summary = torch.cat([local_loss[None], bucket_sum, bucket_count])
        if self.env.world_size > 1:
            dist.all_reduce(summary)
        loss = float(summary[0])
        grad_norm = self._clip_gradients()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self._optimizer_step()
            if self.engine is not None:
                grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
            if self.ema is not None:
                self.ema.update(step + 1)
            self.progress.nonfinite_consecutive = 0
        else:
            self._zero_grad()
            self.progress.nonfinite_total += 1
            self.progress.nonfinite_consecutive += 1
        self.progress.step = step + 1
        self.progress.images += int(counts[0])
        self.progress.real_tokens += int(counts[1])
        sums, totals = summary[1 : 1 + TIMESTEP_BUCKETS], summary[1 + TIMESTEP_BUCKETS :]
        bucket_loss = [float(s / c) if c > 0 else float("nan") for s, c in zip(sums, totals)]
        return StepStats(
            loss=loss,
            grad_norm=grad_norm,
            skipped=not finite,
            images=int(counts[0]),
            real_tokens=int(counts[1]),
            tokens=int(counts[2]),
            bucket_loss=bucket_loss,
            seqlens=seqlens,
        )

    def _global_counts(self, micro_batches) -> torch.Tensor:
        """Global (images, real tokens, tokens); checks every rank has as many micro-batches.

        FSDP needs every rank to run the same number of forwards; a mismatch would hang, so it
        is caught here with one all-reduce (sum of n equals W * n_max only when all n are equal).
        """
        n = len(micro_batches)
        local = [
            sum(mb.num_images for mb in micro_batches),
            sum(mb.num_real_tokens for mb in micro_batches),
            sum(mb.num_tokens for mb in micro_batches),
            n,
            n * n,
        ]
        counts = torch.tensor(local, dtype=torch.int64, device=self.env.device)
        if self.env.world_size > 1:
            dist.all_reduce(counts)
            total, squares = int(counts[3]), int(counts[4])
            if total * total != self.env.world_size * squares:
                raise RuntimeError(
                    f"ranks hold different numbers of micro-batches this step (rank {self.env.rank}: {n}); "
                    "the data loader must give every rank the same count"
                )
        return counts.cpu()

    def _set_gradient_sync(self, last: bool) -> None:
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last)
        elif self.mesh is not None:
            self.model.set_requires_gradient_sync(last)

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        if self.engine is not None:
            # DeepSpeed averages gradients over ranks; the loss is already a share of the global mean.
            self.engine.backward(loss * self.env.world_size, scale_wrt_gas=False)
        else:
            loss.backward()

    def _clip_gradients(self) -> float:
        """Clip to `train.grad_clip` and return the global norm before clipping.

        DeepSpeed clips inside `engine.step()` (its config carries the limit); its norm is read after.
        """
        if self.engine is not None:
            return 0.0
        params = self.trainable_parameters()
        max_norm = self.config.train.grad_clip or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=None)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _optimizer_step(self) -> None:
        if self.engine is not None:
            self.engine.step()
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _zero_grad(self) -> None:
        if self.engine is not None:
            self.engine.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    # ---- the run ----------------------------------------------------------------------------

    def train(self) -> int:
        """Run to `train.steps`; returns the last step reached."""
        cfg = self.config
        try:
            if self.env.is_main:
                (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
            self.maybe_resume()
            iterator = iter(self.loader)
            while self.progress.step < cfg.train.steps:
                started = time.perf_counter()
                step_batch = next(iterator)
                stats = self.train_step(step_batch)
                self._log_step(stats, time.perf_counter() - started)
                if self.progress.nonfinite_consecutive >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{self.progress.nonfinite_consecutive} consecutive steps had a non-finite loss or "
                        f"gradient (last at step {self.progress.step}); stopping without saving. The last good "
                        f"checkpoint in {self.run_dir} is untouched; lower optim.lr or check the data"
                    )
                if self.checkpoints.save_requested:
                    self.save(self.progress.step, force=True)
                    log.info("saved step %d on request; stopping", self.progress.step)
                    return self.progress.step
                self.save(self.progress.step)
            self.save(self.progress.step, force=True)
            self.checkpoints.wait()
            return self.progress.step
        finally:
            self.close()

    def _log_step(self, stats: StepStats, seconds: float) -> None:
        self.metrics.log_step(
            step=self.progress.step,
            loss=stats.loss,
            grad_norm=stats.grad_norm,
            lr=self.scheduler.get_last_lr()[0],
            skipped=stats.skipped,
            images=stats.images,
            real_tokens=stats.real_tokens,
            tokens=stats.tokens,
            seconds=seconds,
            loss_by_t={f"loss_t{i}": value for i, value in enumerate(stats.bucket_loss)},
            nonfinite_total=self.progress.nonfinite_total,
        )

    def close(self) -> None:
        for closer in (getattr(self, "checkpoints", None), getattr(self, "metrics", None)):
            if closer is not None:
                closer.close()
        self.lock.release()


def _unwrapped_names_view(model: torch.nn.Module) -> torch.nn.Module:
    """`model` itself: FSDP2 and `nn.Module.compile` keep names; checkpoint wrappers are named through."""
    return _CleanNames(model)


class _CleanNames:
    """A view whose `named_parameters` drops activation-checkpoint wrapper prefixes."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def named_parameters(self):
        for name, param in self.model.named_parameters():
            yield name.replace("._checkpoint_wrapped_module", ""), param
