"""Held-out validation loss that is comparable across runs, model sizes and world sizes.

The training loss is noisy because every image gets a random timestep and noise. Here each image
of the held-out split (`data.val_path`) is scored at every timestep of a fixed grid, with noise
drawn from a generator seeded by (seed, grid index, sample id). The number is a deterministic
function of the weights and the split: two runs, or two model sizes, are compared on exactly the
same noisy inputs, and splitting the images over ranks changes nothing but the summation order.
A model.objective=ddpm model is scored the same way at a fixed grid of timestep indices with the
release's training loss (fitscale.flow.ddpm_loss, `DDPM_GRID_POINTS`).

The split is read once through the data loader in "images" mode with one step that holds the
whole split (no shuffle, no flips or crops), so every image is scored exactly once.

During training (`train.val_every`), `PeriodicValidation` holds the split's batches for the whole
run and scores them at the due steps. It leaves the run as it found it: the global RNG streams
(Python, NumPy, torch CPU/CUDA) are restored after it, the model's train/eval mode is put back,
and FSDP2 parameters are resharded, so a run with validation trains bit-identically to one
without and resumes bit-identically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from fitscale.checkpoint.stateful import RNGState
from fitscale.config.data import DataConfig
from fitscale.config.ddpm import DdpmConfig
from fitscale.config.train import FlowConfig, TrainConfig
from fitscale.data import build_validation_loader
from fitscale.data.batch import PackedBatch
from fitscale.errors import UserError
from fitscale.flow.ddpm import GaussianDiffusion, create_diffusion
from fitscale.flow.ddpm_loss import ddpm_loss
from fitscale.flow.loss import flow_loss
from fitscale.seeds import image_seed

# Midpoints of 8 equal bins of [0, 1]: every noise level weighs the same.
VALIDATION_TIMESTEPS = tuple((k + 0.5) / 8 for k in range(8))
# A ddpm model (model.objective=ddpm) is scored at the timestep indices of the same 8 bin midpoints,
# int((k + 0.5) / 8 * diffusion_steps): 62, 187, ..., 937 of 1000 (0 = data); metrics val_loss_i<index>.
DDPM_GRID_POINTS = 8
# Keeps validation noise apart from the training noise streams, which use (seed, step, sample id).
NOISE_STREAM = 1 << 40


@dataclass(frozen=True)
class ValidationSettings:
    """How the held-out loss is measured; keep it fixed across the runs you compare."""

    timesteps: tuple[float, ...] = VALIDATION_TIMESTEPS
    seed: int = 0  # seeds the noise, not the run: runs with different seeds share it
    max_images: int | None = None  # the first N images of the split (all by default)
    ddpm: DdpmConfig = field(default_factory=DdpmConfig)  # the diffusion of a ddpm model (train.ddpm)

    def __post_init__(self) -> None:
        if not self.timesteps or not all(0.0 <= t <= 1.0 for t in self.timesteps):
            raise ValueError(f"validation timesteps must be a non-empty list in [0, 1], got {self.timesteps}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"validation max_images must be >= 1, got {self.max_images}")


def validation_batches(
    data: DataConfig, rank: int = 0, world_size: int = 1, max_images: int | None = None
) -> list[PackedBatch]:
    """This rank's micro-batches of one pass over the held-out split (every rank gets as many)."""

    probe = build_validation_loader(data, rank, world_size)
    total = probe.num_samples if max_images is None else min(max_images, probe.num_samples)
    probe.close()
    if total < world_size:
        raise UserError(
            f"data.val_path={data.val_path} has {total} usable images, fewer than the {world_size} ranks"
        )
    one_pass = dataclasses.replace(
        data, batch_mode="images", global_batch_size=total, micro_batches_per_step=1, num_workers=0
    )
    loader = build_validation_loader(one_pass, rank, world_size)
    step = next(iter(loader))
    loader.close()
    return step.micro_batches


def validation_noise(batch: PackedBatch, seed: int, grid_index: int) -> torch.Tensor:
    """(T, C) noise for a CPU batch; image i's depends on (seed, grid index, sample id) only."""
    lengths = batch.lengths.tolist()
    noise = torch.zeros(batch.num_tokens, batch.tokens.shape[1])
    generator = torch.Generator()
    start = 0
    for length, sample_id in zip(lengths[: batch.num_images], batch.sample_ids.tolist()):
        generator.manual_seed(image_seed(seed, NOISE_STREAM + grid_index, sample_id))
        noise[start : start + length] = torch.randn(length, noise.shape[1], generator=generator)
        start += length
    return noise


@torch.no_grad()
def evaluate_validation_loss(
    model: torch.nn.Module,
    batches: Sequence[PackedBatch],
    settings: ValidationSettings = ValidationSettings(),
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean over the timestep grid of the mean per-image loss, plus the loss at each grid point.

    Collective when torch.distributed is initialised (one all-reduce); call it on every rank with
    that rank's `batches`. The model runs in eval mode (no label dropout) and is put back after.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    flow = FlowConfig()  # uniform per-image weighting; timesteps and noise are given
    diffusion = validation_diffusion(model, settings.ddpm)
    grid = settings.timesteps if diffusion is None else ddpm_validation_indices(diffusion.num_timesteps)
    sums = torch.zeros(len(grid) + 1, dtype=torch.float64, device=device)  # per t, then the image count
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            on_device = batch.to(device)
            sums[-1] += batch.num_images
            for k, t in enumerate(grid):
                timesteps = torch.full((batch.num_segments,), float(t), device=device)
                noise = validation_noise(batch, settings.seed, k).to(device)
                if diffusion is None:
                    out = flow_loss(model, on_device, timesteps, noise, 1, flow)
                else:
                    out = ddpm_loss(model, on_device, timesteps, noise, 1, flow, diffusion)
                sums[k] += out.per_image.double().sum()
    finally:
        maybe_reshard(model)
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    images = int(sums[-1])
    if images == 0:
        raise UserError("the validation split gave no images to score")
    per_t = (sums[:-1] / images).tolist()
    metrics = {"val_loss": sum(per_t) / len(per_t), "val_images": float(images)}
    name = "val_loss_t{:.3f}" if diffusion is None else "val_loss_i{}"
    metrics.update({name.format(t): value for t, value in zip(grid, per_t)})
    return metrics


def ddpm_validation_indices(num_timesteps: int) -> tuple[int, ...]:
    """The fixed timestep indices a ddpm model is scored at: the midpoints of 8 equal bins of [0, T)."""
    return tuple(int((k + 0.5) / DDPM_GRID_POINTS * num_timesteps) for k in range(DDPM_GRID_POINTS))


def validation_diffusion(model: torch.nn.Module, ddpm: DdpmConfig) -> GaussianDiffusion | None:
    """The diffusion of a model.objective=ddpm model (its learn_sigma, `ddpm`), None for a flow model."""
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    if getattr(config, "objective", "flow") != "ddpm":
        return None
    return create_diffusion(ddpm, config.learn_sigma)


def run_validation(
    model: torch.nn.Module,
    batches: Sequence[PackedBatch],
    settings: ValidationSettings = ValidationSettings(),
    ema=None,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """The validation metrics of the weights, and with `ema` (fitscale.parallel.ema.EMA) of the average too.

    EMA metrics carry an `_ema` suffix (`val_loss_ema`); the model's own weights are restored after.
    """
    metrics = evaluate_validation_loss(model, batches, settings, device)
    if ema is not None:
        with ema.swap_into(model):
            averaged = evaluate_validation_loss(model, batches, settings, device)
        metrics.update({f"{name}_ema": value for name, value in averaged.items() if name != "val_images"})
    return metrics


def maybe_reshard(model: torch.nn.Module) -> None:
    """Put FSDP2 parameters back into their shards after forwards without a backward.

    A no-grad forward leaves modules with `reshard_after_forward=False` (the last block) gathered;
    the EMA swap and the next training step expect the sharded parameters.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run the block without moving this process's global RNG streams (they drive training)."""

    saved = RNGState().state_dict()
    try:
        yield
    finally:
        RNGState().load_state_dict(saved)


class PeriodicValidation:
    """The held-out loss of a training run: the split read once, scored every `train.val_every`
    steps and at `train.steps`. Collective: every rank builds it and calls `run` at the same steps."""

    def __init__(self, data: DataConfig, train: TrainConfig, rank: int = 0, world_size: int = 1):
        self.every = train.val_every
        self.last_step = train.steps
        self.settings = ValidationSettings(
            seed=train.val_seed, max_images=train.val_max_images, ddpm=train.ddpm
        )
        with preserved_rng():
            self.batches = validation_batches(data, rank, world_size, self.settings.max_images)

    def due(self, step: int) -> bool:
        """Whether validation runs after `step`: every `train.val_every` steps and at the last step."""
        return self.every > 0 and (step % self.every == 0 or step == self.last_step)

    def run(
        self, model: torch.nn.Module, ema=None, device: torch.device | str | None = None
    ) -> dict[str, float]:
        """`run_validation` of the weights (and `ema`), plus `val_seconds`; no RNG stream moves."""
        started = time.perf_counter()
        with preserved_rng():
            metrics = run_validation(model, self.batches, self.settings, ema=ema, device=device)
        metrics["val_seconds"] = time.perf_counter() - started
        return metrics


__all__ = [
    "PeriodicValidation",
    "VALIDATION_TIMESTEPS",
    "ddpm_validation_indices",
    "ValidationSettings",
    "evaluate_validation_loss",
    "run_validation",
    "validation_batches",
    "validation_noise",
]
