"""The training loop: one object that builds the run, takes steps and keeps them safe.

`Trainer(config).train()` is the whole run: join the process group, lock the run folder, build
the model and parallelise it through its ParallelBackend (FSDP2 or DeepSpeed), load the newest complete
checkpoint or initialise, then loop over optimizer steps with gradient accumulation over
micro-batches, clipping, a skip for non-finite steps, EMA, metrics and log lines, the held-out
loss (`train.val_every`), sample grids (`train.sample_every`) and checkpoints. A run resumed
from step S while later checkpoints exist starts a new branch: those checkpoints are moved to
`checkpoints/superseded/from-step-S-attempt-A/` before training (`event=branch`). The loss is
the rectified-flow loss of fitscale.flow (or the DDPM loss of a model.objective=ddpm model,
fitscale.train.objective), normalised by the step's global image count so that neither the rank
count nor the micro-batch split changes a step.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fitscale.checkpoint import CheckpointManager
from fitscale.checkpoint.deepspeed import supersede_deepspeed_steps
from fitscale.checkpoint.export import TRAINING_ONLY_PREFIXES, read_run_start
from fitscale.checkpoint.parts import backend_part
from fitscale.checkpoint.stateful import PerRankState, RNGState
from fitscale.config import RunConfig, to_yaml
from fitscale.config.errors import ConfigError
from fitscale.data import build_loader
from fitscale.data.integrity import digest
from fitscale.diskspace import named_out_of_space
from fitscale.flow import per_image_label_dropout
from fitscale.models import build_model
from fitscale.models.flops import training_flops
from fitscale.models.inputs import check_packed_batch
from fitscale.models.layers import LabelEmbedder
from fitscale.models.official import load_official_checkpoint, load_official_state_dict
from fitscale.models.partial import apply_trainable_patterns
from fitscale.parallel import DistributedEnv, init_distributed
from fitscale.parallel.backend import attach_training_heads, build_backend
from fitscale.runtime.agree import all_ranks_agree, rank0_decides, same_on_all_ranks
from fitscale.train.dataset_shape import follow_training_dataset
from fitscale.train.loglines import configure_console
from fitscale.train.metrics import MetricsLogger, StepStats, Throughput, memory_stats, timestep_bucket_metrics
from fitscale.train.objective import DDPM_TERMS, Objective
from fitscale.train.optim import build_optimizer, scaled_lr
from fitscale.train.previews import PeriodicSamples
from fitscale.train.records import METRICS_FILE, next_attempt
from fitscale.train.repa import RepaTerm
from fitscale.train.resume import report_changes, resume_changes, resume_on_restart
from fitscale.train.schedule import build_lr_scheduler, rebase_lr_scheduler
from fitscale.train.state import Progress, RunLock, SchedulerState, seed_rank
from fitscale.train.validation import PeriodicValidation

log = logging.getLogger("fitscale.train")
RUN_DIR_FULL = "free space there, or point train.run_dir at a larger filesystem"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/inf loss or gradient; the run stops without saving."""


class Trainer:
    """Builds everything a run needs from a RunConfig; `train()` runs it to `train.steps`.

    `history` holds the metrics of the last `HISTORY_STEPS` steps in memory (oldest first; the last
    one is the newest step's), so a long run does not grow with its step count; every step's
    metrics are in `metrics.jsonl`.
    """

    HISTORY_STEPS = 1000

    def __init__(self, config: RunConfig, env: DistributedEnv | None = None, loader: Any = None):
        """`loader` replaces `build_loader(config.data, ...)`: any Stateful iterable of StepBatch."""
        self.config = config
        self.env = env or init_distributed(config.train.device)
        configure_console(self.env.rank)
        self.run_dir = Path(config.train.run_dir)
        self.lock = RunLock(self.run_dir)
        self.checkpoints = self.metrics = self.loader = None
        self._acquire_lock()
        try:
            self._build(loader)
        except BaseException:
            self.close()  # a failed construction leaves the run folder free for the next attempt
            raise

    def _build(self, loader: Any) -> None:
        if loader is None:  # the model's in_channels / patch_size follow the dataset's latents
            follow_training_dataset(self.config)
        self.model_config = self.config.model_config()
        self.progress = Progress()
        self.backend = build_backend(self.config, self.env)  # FSDP2 or DeepSpeed (parallel.backend)
        self.backend_part = backend_part(
            self.backend, self.config.train.run_dir
        )  # what a checkpoint holds of it
        self.model = self._build_model()
        self.objective = Objective(self.model_config, self.config.train)  # flow or ddpm (train/objective.py)
        self.repa = self._build_repa()
        self.optimizer, self.scheduler = self._build_optimizer()
        self.ema = self._build_ema()
        self.loader = loader if loader is not None else self._build_loader()
        self.validation = self._build_validation()
        self.samples = self._build_samples()
        self.checkpoints = self._build_checkpoint_manager()
        self.metrics = None  # built in train(), once the start step is known
        self.config_changes = []  # fields changed since the checkpoint resumed from (train.resume)
        self.stopped_by: str | None = None  # the signal that stopped the run early (SIGTERM, SIGINT...)
        self.history: deque[dict[str, Any]] = deque(maxlen=self.HISTORY_STEPS)

    # ---- building ---------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        """Rank 0 takes the run-folder lock; every rank raises its error if it could not."""
        rank0_decides(self.lock.acquire)  # RunFolderInUseError, OSError: the same on every rank

    def _full_initial_state(self) -> dict[str, torch.Tensor]:
        """The initial weights, built on the CPU from the run seed (or `train.init_from`).

        Built in full on rank 0 and broadcast, so initial weights do not depend on the world size.
        """

        torch.manual_seed(self.config.train.seed)
        model = build_model(self.config.model.name, **dict(self.config.model.overrides))
        init_from = self.config.train.init_from
        if init_from and Path(init_from).is_dir():  # another run's checkpoint, of either backend
            load_official_state_dict(model, read_run_start(init_from))
        elif init_from:
            load_official_checkpoint(model, init_from)
        attach_training_heads(model, self.config)  # REPA's projector, seeded after the network
        return model.state_dict()

    @property
    def float8_report(self):
        """Which linears of the model became float8 (fitscale.parallel.float8.Float8Report)."""
        return self.backend.float8_report

    def _build_model(self) -> torch.nn.Module:
        # Label dropout is drawn per image in the step (per_image_label_dropout), so the model's own is
        # turned off (its label table keeps the null-class row that class_dropout_prob > 0 gives), and
        # the step takes the probability from the run's model config.
        model = self.backend.build_model(self._full_initial_state)
        for module in model.modules():
            if isinstance(module, LabelEmbedder):
                module.dropout_prob = 0.0
        self.label_dropout = self.model_config.class_dropout_prob
        self.null_class = self.model_config.num_classes
        self._apply_trainable(model)
        seed_rank(self.config.train.seed, self.env.rank)
        return model

    def _build_repa(self):
        """The alignment term of `train.repa` (fitscale.train.repa), or None when it is off."""
        if not self.config.train.repa.enabled:
            return None

        return all_ranks_agree(lambda: RepaTerm(self.config, self.env.device))

    def _apply_trainable(self, model: torch.nn.Module) -> None:
        count = apply_trainable_patterns(model, list(self.config.train.trainable))
        if count is not None:
            log.info("training %d of the model's parameter values; the rest stay frozen", count)

    def _build_optimizer(self):

        cfg = self.config
        optimizer = build_optimizer(self.model, cfg.optim, global_batch_size=self.global_batch_size())
        self.backend.wrap_optimizer(optimizer)
        # The config's hyperparameters of each group (betas, eps, weight decay, kernel choice), put back
        # over the saved ones after a resume: an edited config takes effect from the first resumed step.
        self._group_settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        scheduler = build_lr_scheduler(optimizer, cfg.optim.schedule, total_steps=cfg.train.steps)
        return optimizer, scheduler

    def _apply_config_to_loaded_optimizer(self) -> None:

        for group, settings in zip(self.optimizer.param_groups, self._group_settings):
            group.update(settings)
        rebase_lr_scheduler(self.scheduler, scaled_lr(self.config.optim, self.global_batch_size()))

    def global_batch_size(self) -> int | None:
        """Images per optimizer step across all ranks, when the data section fixes it."""
        value = getattr(self.config.data, "global_batch_size", None) or getattr(
            self.config.data, "batch_size", None
        )
        return int(value) if value else None

    def _build_ema(self):
        if not self.config.optim.ema.enabled:
            return None
        ema = self.backend.build_ema(self.config.optim.ema)
        init_from = self.config.train.init_from
        if init_from and Path(init_from).is_dir():  # that run's EMA goes on (else it starts from the weights)
            start = all_ranks_agree(lambda: read_run_start(init_from, "ema"))
            if start is not None:
                ema.load_full({**self._training_heads_start(), **start})
        return ema

    def _training_heads_start(self) -> dict[str, torch.Tensor]:
        """The initial weights of the heads a run's start leaves out (REPA's projector: another run's
        EMA holds none), for its EMA to start from; {} without such heads. The global RNG is kept."""
        if not self.config.train.repa.enabled:
            return {}

        with torch.random.fork_rng(devices=[]):
            initial = self._full_initial_state()
        return {name: value for name, value in initial.items() if name.startswith(TRAINING_ONLY_PREFIXES)}

    def _build_loader(self):
        """This rank's loader; every rank reads the dataset's files itself, so the ranks then check
        that they opened the same dataset (the same sample table) and fail together if not."""

        data = self.config.data
        loader = all_ranks_agree(lambda: build_loader(data, self.env.rank, self.env.world_size))
        table = getattr(loader, "table", None)
        if table is not None:
            identity = {"samples": int(table.shape[0]), "xxh64": digest(table.tobytes())}
            same_on_all_ranks(identity, f"datasets at data.path={data.path}")
        self._warn_small_dataset(getattr(loader, "num_samples", None))
        return loader

    def _warn_small_dataset(self, num_samples: int | None) -> None:
        """Rank 0 warns once when a step of `data.global_batch_size` images holds every image of the
        dataset several times (the planner fills a step across epochs): intended for a smoke test,
        a surprise otherwise."""
        data = self.config.data
        if not self.env.is_main or data.batch_mode != "images" or not num_samples:
            return
        if num_samples < data.global_batch_size:
            log.warning(
                "data.path=%s holds %d usable images, fewer than data.global_batch_size=%d: every step repeats "
                "each image about %.1f times; write a larger dataset or lower data.global_batch_size",
                data.path, num_samples, data.global_batch_size, data.global_batch_size / num_samples,
            )  # fmt: skip

    def _build_validation(self):
        """The held-out split's batches, read once for the run (None when `train.val_every` is 0)."""
        train = self.config.train
        if train.val_every <= 0:
            return None

        try:
            return all_ranks_agree(
                lambda: PeriodicValidation(self.config.data, train, self.env.rank, self.env.world_size)
            )
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(
                f"train.val_every={train.val_every}: the held-out split data.val_path="
                f"{self.config.data.val_path} cannot be read: {str(error).splitlines()[0]}"
            ) from error

    def _build_samples(self):
        """The sample grids of `train.sample_every` (None when it is 0)."""
        if self.config.train.sample_every <= 0:
            return None

        return PeriodicSamples(self.config, self.env.rank, self.env.device)

    def _build_checkpoint_manager(self):
        from dataclasses import asdict

        # Each checkpoint records the config it was trained with, for the checks of a later resume.
        manager = CheckpointManager(
            self.run_dir, self.config.checkpoint, metadata={"config": asdict(self.config)}
        )
        # A killed run's unfinished save may fill the disk: free it before the first write (we hold the lock).
        manager.remove_leftovers()
        manager.on_published = self._checkpoint_published
        return manager

    def _checkpoint_published(self, step: int, path: Path) -> None:
        """`event=checkpoint` once the checkpoint is complete on disk (an asynchronous save's later)."""
        if self.metrics is not None:
            self.metrics.event("checkpoint", step, path=str(path))

    def _build_metrics(self, start_step: int, attempt: int):
        from dataclasses import asdict

        return MetricsLogger(
            self.run_dir,
            self.config.log,
            self.env.rank,
            total_steps=self.config.train.steps,
            start_step=start_step,
            config=asdict(self.config),
            attempt=attempt,
        )

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds, as Statefuls keyed by name."""

        return {
            "lr_scheduler": SchedulerState(self.scheduler),
            "data": self.loader,
            "rng": PerRankState(RNGState()),
            "progress": self.progress,
            **self.backend_part.state(self.optimizer, self.ema),  # DeepSpeed: in its own files
        }

    # ---- resuming ---------------------------------------------------------------------------

    def maybe_resume(self) -> int | None:
        """Load the checkpoint `train.resume` asks for; returns its step, or None for a fresh start."""

        folder = self.checkpoints.folder
        resume = rank0_decides(lambda: resume_on_restart(self.config.train.resume, folder, dict(os.environ)))
        try:
            step = self.checkpoints.resume_step(resume)
        except (FileExistsError, FileNotFoundError, ValueError) as error:
            raise ConfigError(str(error)) from error
        if step is None:
            return None

        # Before anything is loaded: refuses a change of a field that may not change on resume.
        self.config_changes = resume_changes(self.config, self.checkpoints.step_path(step))
        self.backend_part.load(step, self.ema)
        self.checkpoints.load(step, self.state())
        self._apply_config_to_loaded_optimizer()
        return step

    def _start_branch(self, start_step: int, attempt: int) -> dict[str, Any] | None:
        """Move the checkpoints of steps after `start_step` aside (a resume from an earlier step makes
        them an abandoned branch); returns the `branch` event's fields, or None when there were none."""
        branch = f"from-step-{start_step}-attempt-{attempt}"
        folder, moved = self.checkpoints.supersede(start_step, branch)
        if folder is None:
            return None

        rank0_decides(lambda: supersede_deepspeed_steps(self.run_dir, start_step, folder.name))
        return {"resumed_from": start_step, "superseded": moved, "moved_to": str(folder)}

    def maybe_save(self, force: bool = False) -> bool:
        """Checkpoint at the interval, on a signal, or when forced (collective on every rank)."""
        step = self.progress.step
        # A backend with files of its own writes them first: then the manager must publish the step.
        force = self.backend_part.save(step, force, self.checkpoints, self.ema) or force
        return self.checkpoints.maybe_save(step, self.state(), force=force)

    # ---- one step ---------------------------------------------------------------------------

    def train_step(self, step_batch) -> StepStats:
        """Forward/backward every micro-batch of this rank, then one optimizer step (or a skip)."""
        cfg = self.config
        step = self.progress.step
        micro_batches = step_batch.micro_batches
        counts = self._global_counts(micro_batches)
        global_images = step_batch.global_num_images or int(counts[0])
        self.model.train()
        buckets = cfg.log.timestep_buckets
        local_loss = torch.zeros((), dtype=torch.float64, device=self.env.device)
        bucket_sum = torch.zeros(buckets, dtype=torch.float64, device=self.env.device)
        bucket_count = torch.zeros(buckets, dtype=torch.float64, device=self.env.device)
        seqlens: list[int] = []
        repa_weight = self.repa.weight(step) if self.repa is not None else 0.0
        local_repa = torch.zeros((), dtype=torch.float64, device=self.env.device)
        local_terms = torch.zeros(len(DDPM_TERMS), dtype=torch.float64, device=self.env.device)
        for index, micro in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            timesteps, noise = self.objective.draw(micro, step)
            labels = per_image_label_dropout(micro, cfg.train.seed, step, self.label_dropout, self.null_class)
            micro = replace(micro, labels=labels)
            lengths = (micro.cu_seqlens[1:] - micro.cu_seqlens[:-1])[: micro.num_images].tolist()
            seqlens.extend(lengths)
            if self.env.device.type != "cpu":  # the model reads no device values (no sync): check them here
                self._check_host_batch(micro, timesteps)
            batch = micro.to(self.env.device)
            timesteps = timesteps.to(self.env.device, non_blocking=True)
            noise = noise.to(self.env.device, non_blocking=True)
            self.backend.set_gradient_sync(last)
            hidden_after = self.repa.block if repa_weight else None
            out = self.objective.loss(
                self.backend.forward_module, batch, timesteps, noise, global_images, hidden_after
            )
            loss = out.loss
            if repa_weight:
                align = self.repa.loss(micro, batch, out.hidden, global_images)
                loss = loss + repa_weight * align
                local_repa += align.detach().double()
            self.backend.backward(loss)
            local_loss += out.loss.detach().double()
            local_terms += self.objective.term_sums(out, global_images, self.env.device)
            bucket = (out.timesteps * buckets).long().clamp(0, buckets - 1)
            bucket_sum.index_add_(0, bucket, out.per_image.double())
            bucket_count.index_add_(0, bucket, torch.ones_like(out.per_image, dtype=torch.float64))
        summary = torch.cat([local_loss[None], bucket_sum, bucket_count, local_repa[None], local_terms])
        if self.env.world_size > 1:
            dist.all_reduce(summary)
        loss = float(summary[0])
        grad_norm = self.backend.clip_gradients()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            measured = self.backend.step(self.optimizer)  # DeepSpeed clips in its step and measures there
            grad_norm = grad_norm if measured is None else measured
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(step + 1)
            self.progress.nonfinite_consecutive = 0
        else:
            self.backend.zero_grad(self.optimizer)
            self.progress.nonfinite_total += 1
            self.progress.nonfinite_consecutive += 1
        self.progress.step = step + 1
        self.progress.images += int(counts[0])
        self.progress.real_tokens += int(counts[1])
        return StepStats(
            loss=loss,
            grad_norm=grad_norm,
            skipped=not finite,
            images=int(counts[0]),
            real_tokens=int(counts[1]),
            tokens=int(counts[2]),
            bucket_sums=summary[1 : 1 + buckets].cpu(),
            bucket_counts=summary[1 + buckets : 1 + 2 * buckets].cpu(),
            seqlens=seqlens,
            repa_loss=float(summary[-1 - len(DDPM_TERMS)]) if repa_weight else None,
            terms=self.objective.terms(summary[-len(DDPM_TERMS) :].tolist()),
        )

    def _check_host_batch(self, micro, timesteps: torch.Tensor) -> None:
        """The packed-batch contract (fitscale.models.inputs) on the collator's host tensors."""
        config = self.model_config
        check_packed_batch(
            micro.tokens, timesteps, micro.labels, micro.pos, micro.cu_seqlens, micro.max_seqlen, micro.sizes,
            token_dim=config.token_dim,
            num_classes=config.num_classes,
            padded=config.attn_backend == "padded",
        )  # fmt: skip

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

    # ---- the run ----------------------------------------------------------------------------

    def train(self) -> int:
        """Run to `train.steps` (or until an exit signal); returns the last step reached."""
        cfg = self.config
        try:
            resumed = self.maybe_resume()  # a refused resume leaves the folder as it was
            start_step = resumed or 0
            attempt = rank0_decides(lambda: next_attempt(self.run_dir / METRICS_FILE))
            branch = self._start_branch(start_step, attempt)  # before anything of this attempt is written
            if self.env.is_main:
                self._write_config()
            self.metrics = self._build_metrics(start_step, attempt)
            if resumed is not None:
                self.metrics.event(
                    "resume", start_step, checkpoint=str(self.checkpoints.step_path(start_step))
                )
            if branch is not None:
                self.metrics.event("branch", start_step, **branch)
            report_changes(self.config_changes, start_step, self.metrics)
            self.throughput = Throughput(self.env.world_size, self.env.device, self.config.log.peak_flops)
            iterator = iter(self.loader)
            while self.progress.step < cfg.train.steps:
                waited = time.perf_counter()
                step_batch = next(iterator)
                self.throughput.add_data_wait(time.perf_counter() - waited)
                stats = self.train_step(step_batch)
                self._log_step(stats, self.maybe_validate())
                self.maybe_sample()
                if self.progress.nonfinite_consecutive >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{self.progress.nonfinite_consecutive} consecutive steps had a non-finite loss or "
                        f"gradient (last at step {self.progress.step}); stopping without saving. The last good "
                        f"checkpoint in {self.run_dir} is untouched; lower optim.lr or check the data"
                    )
                at_end = self.progress.step >= cfg.train.steps and cfg.checkpoint.save_at_end
                self.maybe_save(force=at_end)  # `event=checkpoint` comes once it is published
                if self.checkpoints.stopping:  # every rank, once the exit signal's checkpoint is complete
                    self._stop_on_signal()
                    break
            self.checkpoints.wait()
            return self.progress.step
        finally:
            self.close()

    def _write_config(self) -> None:
        """`config.yaml` (rank 0) through a temporary file and a rename: a full disk (OutOfSpaceError
        naming it) or a crash leaves the previous start's file whole, never cut short."""
        path = self.run_dir / "config.yaml"
        partial = path.with_name(".config.yaml.partial")
        try:
            with named_out_of_space(path, "the run's config", RUN_DIR_FULL):
                partial.write_text(to_yaml(self.config))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)  # after a failure (after the rename there is none)

    def _stop_on_signal(self) -> None:
        """The `stop` event of a run an exit signal stopped (its checkpoint is complete by now)."""
        self.stopped_by = self.checkpoints.last_signal
        step = self.progress.step
        path = self.checkpoints.step_path(step)
        self.metrics.event("stop", step, signal=self.stopped_by, checkpoint=str(path))
        if self.stopped_by == "SIGINT" and self.env.is_main:
            log.warning("interrupted: checkpoint %s saved; run again to resume", path.name)

    def maybe_validate(self) -> dict[str, float]:
        """The held-out loss of the weights and the EMA when this step is due (collective), else {}.

        Its time is left out of the throughput window, so images/s and MFU measure training only.
        """
        if self.validation is None or not self.validation.due(self.progress.step):
            return {}
        metrics = self.validation.run(self.backend.forward_module, self.ema, self.env.device)
        self.throughput.exclude(metrics["val_seconds"])
        shown = ("val_loss", "val_loss_ema", "val_seconds")
        self.metrics.event("validation", self.progress.step, **{k: metrics[k] for k in shown if k in metrics})
        return metrics

    def maybe_sample(self) -> None:
        """The sample grid when this step is due (collective; rank 0 writes it), left out of throughput."""
        if self.samples is None or not self.samples.due(self.progress.step):
            return
        path, seconds = self.samples.run(self.model, self.ema, self.progress.step)
        self.throughput.exclude(seconds)
        self.metrics.event("samples", self.progress.step, path=str(path) if path else None, seconds=seconds)
        if path is not None:
            self.metrics.log_image(self.progress.step, "samples", path)

    def _log_step(self, stats: StepStats, validation: dict[str, float] | None = None) -> None:
        """This step's metrics to the JSONL/wandb/progress-bar sinks (rank 0 unless log.all_ranks)."""

        # FLOPs from this rank's images, scaled to the world: exact for balanced ranks, close otherwise.
        flops = training_flops(self.model_config, stats.seqlens) * self.env.world_size
        self.throughput.update(stats.images, stats.real_tokens, stats.tokens, flops)
        metrics: dict[str, Any] = {
            "loss": stats.loss,
            "grad_norm": stats.grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "skipped": int(stats.skipped),
            "nonfinite_total": self.progress.nonfinite_total,
            "images": stats.images,
            "flops": flops,  # this step's training FLOPs, all ranks (fitscale report sums them)
            **timestep_bucket_metrics(stats.bucket_sums, stats.bucket_counts),
            **self._repa_metrics(stats),
            **(stats.terms or {}),
            **(validation or {}),
        }
        step = self.progress.step
        if step % self.config.log.every == 0 or step == self.config.train.steps:
            metrics.update(self.throughput.rates())
            metrics.update(memory_stats(self.env.device))
        self.history.append({"step": step, **metrics})
        if stats.skipped:
            self.metrics.event("nonfinite_step_skipped", step, loss=stats.loss, grad_norm=stats.grad_norm)
        self.metrics.log(step, metrics)

    def _repa_metrics(self, stats: StepStats) -> dict[str, float]:
        """`repa_loss` (unweighted, the step's mean) and `encoder_s` (this rank's encoder seconds)."""
        if self.repa is None:
            return {}
        seconds = self.repa.take_seconds()
        return {} if stats.repa_loss is None else {"repa_loss": stats.repa_loss, "encoder_s": seconds}

    def close(self) -> None:
        """Finish pending saves, close the metrics sinks and release the run folder (also after a failure)."""
        try:
            for closer in (self.checkpoints, self.metrics):
                if closer is not None:
                    closer.close()
        finally:
            self.lock.release()
