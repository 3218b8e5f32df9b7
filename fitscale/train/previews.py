"""Sample grids during training (`train.sample_every`): the same images at every due step.

A fixed set of classes x sizes (one size beyond the training grid, so the run's RoPE
extrapolation shows) is drawn from fixed noise (seeded by `train.seed` and the image's index,
fitscale.sample.plan.initial_noise) with the EMA weights, by the sampler of fitscale.sample,
and written by rank 0 as a labelled grid (`fitscale.sample.pictures.class_size_grid`) to
`<run_dir>/samples/step-N.png`: decoded with `train.sample_vae` when set, else one latent
channel in grey.

Sampling is collective: with FSDP every rank holds a shard of the weights and the EMA, so every
rank swaps its EMA shard in and runs the same forwards (the mechanism of validation,
fitscale.train.validation). It leaves the run as it found it: the model's own weights and
train/eval mode come back, FSDP parameters are resharded, and the global RNG streams are
restored, so a run trains bit-identically with or without grids.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from fitscale.config import RunConfig
from fitscale.config.errors import ConfigError
from fitscale.config.train import parse_grid
from fitscale.data.format import read_meta
from fitscale.data.vae import check_vae_folder, decode_latents, load_vae
from fitscale.flow.samplers import FIXED_GRID
from fitscale.sample.generate import generate_latents
from fitscale.sample.options import SamplingOptions
from fitscale.sample.pictures import (
    class_size_grid,
    extrapolation_name,
    grid_caption,
    preview_latents,
    save_png,
)
from fitscale.sample.plan import SampleItem
from fitscale.train.validation import maybe_reshard, preserved_rng

MAX_ROWS = 10  # classes in a default grid


def default_labels(num_classes: int, count: int = MAX_ROWS) -> list[int]:
    """Up to `count` classes spread evenly over [0, num_classes): 0..9 for ten classes, 0, 100, ... for 1000."""
    count = min(count, num_classes)
    return [i * num_classes // count for i in range(count)]


def default_grids(side: int) -> list[tuple[int, int]]:
    """Columns for a model trained up to `side` x `side` tokens: that square, a wide and a tall one
    at half height / width, and a square 1.25x beyond it (extrapolation)."""
    half = max(1, side // 2)
    beyond = side + max(1, side // 4)
    return [(side, side), (half, side), (side, half), (beyond, beyond)]


def dataset_meta(path: str | None) -> dict:
    """The dataset's fitscale.json, or {} when it cannot be read (a remote dataset not cached yet)."""

    try:
        return read_meta(path) if path else {}
    except (FileNotFoundError, ValueError, OSError):
        return {}


def trained_side(meta: dict, max_image_tokens: int) -> int:
    """The largest grid side the model trained on: the dataset's `grid_sides` when it records them
    (the digits), else the side of the largest square image, sqrt(data.max_image_tokens)."""
    sides = meta.get("grid_sides")
    return int(max(sides)) if sides else math.isqrt(max_image_tokens)


class PeriodicSamples:
    """The grids of one run; every rank builds it and calls `run` at the same (due) steps."""

    def __init__(self, config: RunConfig, rank: int = 0, device: torch.device | str = "cpu"):

        train = config.train
        self.every = train.sample_every
        self.last_step = train.steps
        self.rank = rank
        self.device = torch.device(device)  # of the VAE that decodes the grid
        self.out_dir = Path(train.run_dir) / "samples"
        meta = dataset_meta(config.data.path)
        labels = list(train.sample_labels) or default_labels(config.data.num_classes)
        # a dataset written with fewer tokens per image than data.max_image_tokens (DC-AE f32: 64 at
        # 256x256) bounds the grids the model saw
        limit = min(
            config.data.max_image_tokens, int(meta.get("max_image_tokens") or config.data.max_image_tokens)
        )
        grids = [parse_grid(g) for g in train.sample_grids] or default_grids(trained_side(meta, limit))
        vae = meta.get("vae") or {}
        pixels_per_token = int(vae.get("downsample", 8)) * int(meta.get("patch_size", 2))
        self.items = [
            SampleItem(index, label, rows, cols, pixels_per_token)
            for index, (label, (rows, cols)) in enumerate((label, grid) for label in labels for grid in grids)
        ]
        largest = max(item.tokens for item in self.items)
        guided = train.sample_cfg_scale != 1.0
        self.options = SamplingOptions(
            sampler=train.sample_sampler,
            # adaptive samplers pick their own steps; ddpm takes sample_steps respaced steps
            steps=train.sample_steps if train.sample_sampler in (*FIXED_GRID, "ddpm") else None,
            cfg_scale=train.sample_cfg_scale,
            seed=train.seed,
            token_budget=max(config.data.token_budget, largest * (2 if guided else 1)),
            # The same fixed items every time: packed forwards (one FSDP all-gather per block for the
            # whole grid, not one per image) are reproducible here, and batch invariance buys nothing.
            batch_invariant=False,
            guidance_channels=3 if train.sample_sampler == "ddpm" else None,  # the release's v1 guidance
            ddpm=train.ddpm if train.sample_sampler == "ddpm" else None,
        )
        self.class_names = meta.get("classes")
        self.preview_channel = int(meta.get("preview_channel") or 0)
        self.extrapolation = extrapolation_name(config.model_config())
        self.vae_path = train.sample_vae
        self._vae = None
        if self.vae_path is not None:  # a bad folder fails at start-up, not at the first grid
            try:
                check_vae_folder(self.vae_path, config.model_config().in_channels)
            except (FileNotFoundError, ValueError) as error:
                message = str(error).replace(f"--vae {self.vae_path}", f"train.sample_vae={self.vae_path}")
                raise ConfigError(message) from error

    def due(self, step: int) -> bool:
        """Whether sample grids are drawn after `step`: every `train.sample_every` steps and at the last
        step.
        """
        return self.every > 0 and (step % self.every == 0 or step == self.last_step)

    def run(self, model: torch.nn.Module, ema, step: int) -> tuple[Path | None, float]:
        """Draw the grid with `ema`'s weights (the model's own when None); returns (the PNG rank 0
        wrote, None elsewhere; seconds taken). Collective over the ranks that shard `model`."""
        started = time.perf_counter()
        with preserved_rng():
            latents = self._generate(model, ema)
        path = self._write(latents, step) if self.rank == 0 else None
        return path, time.perf_counter() - started

    def _generate(self, model: torch.nn.Module, ema) -> list[torch.Tensor]:
        from dataclasses import replace

        # Weights kept in bf16 (DeepSpeed) need a bf16 autocast for the float32 noise, on any device.
        bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
        options = replace(self.options, autocast="bf16") if bf16 else self.options
        was_training = model.training
        swap = ema.swap_into(model) if ema is not None else contextlib.nullcontext(model)
        try:
            with swap:
                try:
                    return generate_latents(model, self.items, options)
                finally:
                    maybe_reshard(model)  # before the swap restores the sharded weights
        finally:
            model.train(was_training)

    def _write(self, latents: list[torch.Tensor], step: int) -> Path:

        if self.vae_path is not None:
            if self._vae is None:
                self._vae = load_vae(self.vae_path, self.device, latents[0].shape[0])
            pictures, unit, scale = decode_latents(self._vae, latents), "pixels", 1
        else:
            pictures, unit = preview_latents(latents, self.preview_channel), "tokens"
            scale = max(1, 64 // max(max(p.shape[:2]) for p in pictures))  # small latents readable
        caption = grid_caption(self.options, self.extrapolation, step, size_unit=unit)
        grid = class_size_grid(self.items, pictures, self.class_names, caption, size_unit=unit, scale=scale)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"step-{step}.png"
        save_png(grid, path)
        return path
