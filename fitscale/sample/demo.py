"""The CPU demo (recipes/demo.yaml): its dataset written before training, and its closing
pictures, class-conditional digits at several aspect ratios with a check that a classifier
trained on the real digits recognises them.

`fitscale train` knows nothing of the demo: the recipe names `prepare_digits` in `hooks.before`
and `sample_grid` in `hooks.after`, and their settings (`DemoOptions`) in `hooks.options`.

The digits dataset (fitscale.data.sources.render_digit) draws each 8x8 digit, scaled up with
its aspect kept, into the centre square of latent channel 0 as 2 * ink - 1. `latent_to_digit`
undoes exactly that: channel 0 back to ink in [0, 1], the centre square, an area-average down to
8x8 and the 0..16 scale of scikit-learn's digits, which is what the classifier was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fitscale.checkpoint.layout import find_checkpoint
from fitscale.config.ddpm import DdpmConfig
from fitscale.config.schema import load_structured
from fitscale.data.cli import register
from fitscale.data.format import META_FILE, read_meta
from fitscale.errors import UserError
from fitscale.flow.samplers import FIXED_GRID
from fitscale.sample.generate import generate_latents, load_sampling_model, training_ddpm
from fitscale.sample.options import SamplingOptions
from fitscale.sample.pictures import (
    class_size_grid,
    extrapolation_name,
    grid_caption,
    preview_latents,
    save_png,
)
from fitscale.sample.plan import SampleItem

# Grids (rows, cols) in tokens for digits trained at 4..16 tokens a side: square, wide, tall, large.
DEMO_GRIDS = ((8, 8), (6, 12), (12, 6), (14, 14))


@dataclass
class DemoOptions:
    """The demo's settings, `hooks.options` of recipes/demo.yaml."""

    digits_min_side: int = 4
    """Smallest grid side of the digits, in tokens (`fitscale data digits --min-side`)."""
    digits_max_side: int = 16
    """Largest grid side of the digits, in tokens: small digits train many more steps per minute."""
    sample_cfg_scale: float = 4.0
    """Classifier-free guidance scale of the closing samples."""

    def __post_init__(self) -> None:
        if not 1 <= self.digits_min_side <= self.digits_max_side <= 16:
            raise UserError(
                f"hooks.options.digits_min_side={self.digits_min_side}, hooks.options.digits_max_side="
                f"{self.digits_max_side}: need 1 <= digits_min_side <= digits_max_side <= 16"
            )
        if self.sample_cfg_scale < 0:
            raise UserError(f"hooks.options.sample_cfg_scale={self.sample_cfg_scale}: must be >= 0")

    @classmethod
    def from_config(cls, config) -> DemoOptions:
        """The options of a RunConfig's `hooks.options`, read by the one config loader; ConfigError (a
        ValueError) names an unknown option or a bad value."""

        return load_structured(cls, values=dict(config.hooks.options), source="hooks.options")


def prepare_digits(config) -> None:
    """`hooks.before`: write the digits dataset into `data.path` unless it is there (`maybe_prepare_digits`)."""
    options = DemoOptions.from_config(config)
    maybe_prepare_digits(config.data.path, options.digits_min_side, options.digits_max_side)


def sample_grid(config) -> dict:
    """`hooks.after`: the closing grid of digits from the run's final checkpoint, and its score."""
    options = DemoOptions.from_config(config)
    grids = demo_grids(options.digits_min_side, options.digits_max_side)
    sampler = "ddpm" if config.model_config().objective == "ddpm" else "heun"  # the objective's sampler
    return sample_demo_grid(
        config.train.run_dir, cfg_scale=options.sample_cfg_scale, grids=grids, sampler=sampler
    )


def maybe_prepare_digits(path: str | None, min_side: int = 4, max_side: int = 16) -> None:
    """Write the digits dataset (`fitscale data digits PATH`) unless a dataset is already there.

    An existing digits dataset is reused only when its grid sides are the ones asked for: the
    demo's step count and guidance are tuned to the size of its digits.
    """

    if not path:
        raise UserError("the demo needs data.path: set data.path=data/digits")
    if (Path(path) / META_FILE).is_file():
        meta = read_meta(path)
        sides = list(meta.get("grid_sides", [4, 16])) if meta.get("writer", "digits") == "digits" else None
        if sides is not None and sides != [min_side, max_side]:
            raise UserError(
                f"{path}: this digits dataset has grid sides {sides[0]}..{sides[1]} tokens but the recipe asks "
                f"for hooks.options.digits_min_side={min_side}, hooks.options.digits_max_side={max_side}; "
                f"delete {path} to have it rewritten, or point data.path at another folder"
            )
        return
    import argparse

    print(f"fitscale train: writing the digits dataset to {path} (hooks.before)", flush=True)
    command = [
        "data",
        "digits",
        str(path),
        "--no-progress",
        "--min-side",
        str(min_side),
        "--max-side",
        str(max_side),
    ]
    parser = argparse.ArgumentParser(prog="fitscale")  # `fitscale data ...` alone: its own defaults
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(command)
    args.func(args)


def demo_grids(min_side: int, max_side: int) -> tuple[tuple[int, int], ...]:
    """Grids within the trained sides: a middle and a largest square, a wide and a tall one (1:2)."""
    middle = (min_side + max_side) // 2
    short = max(min_side, max_side // 2)
    return ((middle, middle), (short, max_side), (max_side, short), (max_side, max_side))


def latent_to_digit(latent: torch.Tensor | np.ndarray) -> np.ndarray:
    """(4, h, w) digits latent -> (8, 8) float array in [0, 16], the inverse of `render_digit`."""
    from PIL import Image

    picture = np.asarray(latent[0], dtype=np.float32)
    ink = np.clip((picture + 1.0) / 2.0, 0.0, 1.0)
    height, width = ink.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = Image.fromarray(np.ascontiguousarray(ink[top : top + side, left : left + side]), mode="F")
    return np.asarray(square.resize((8, 8), Image.BOX), dtype=np.float32) * 16.0


def digits_classifier():
    """An RBF SVM on all 1,797 real digits (about 99% on held-out real digits)."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)


def draw_digits(
    model: torch.nn.Module,
    grids: tuple[tuple[int, int], ...],
    per_class: int,
    sampler: str,
    steps: int,
    cfg_scale: float,
    seed: int,
    ddpm: DdpmConfig | None = None,
) -> tuple[list[SampleItem], SamplingOptions, list[torch.Tensor]]:
    """`per_class` samples of every class at every grid (rows, cols in tokens), ordered class, grid,
    repeat: the items, the sampling options and the (4, 2 * rows, 2 * cols) latents.

    `sampler` is any of `fitscale sample --sampler` (the model's objective decides which fit);
    `steps` applies to grid samplers and `ddpm` (adaptive ones pick their own); `ddpm` is the
    diffusion a `ddpm` sampler runs (the run's `train.ddpm`, fitscale.sample.generate.training_ddpm),
    guided on 3 channels as the release's v1 sampler. The same arguments give the same images: every
    image's noise is seeded by (seed, index)."""
    items: list[SampleItem] = []
    for label in range(model.config.num_classes):
        for rows, cols in grids:
            for _ in range(per_class):
                items.append(SampleItem(len(items), label, rows, cols))
    steps_or_none = steps if sampler in (*FIXED_GRID, "ddpm") else None  # adaptive ones pick their own steps
    # A fixed set of images, always drawn together: packed forwards are reproducible here and far
    # cheaper than one forward per image (fitscale.sample.generate, "Batch invariance").
    options = SamplingOptions(
        sampler=sampler,
        steps=steps_or_none,
        cfg_scale=cfg_scale,
        seed=seed,
        token_budget=8192,
        batch_invariant=False,
        guidance_channels=3 if sampler == "ddpm" else None,  # the release's v1 guidance
        ddpm=ddpm if sampler == "ddpm" else None,
    )
    return items, options, generate_latents(model, items, options)


def sample_demo_grid(
    run_dir: str | Path,
    out: str | Path | None = None,
    grids: tuple[tuple[int, int], ...] = DEMO_GRIDS,
    per_class: int = 2,
    cfg_scale: float = 4.0,
    sampler: str = "heun",
    steps: int = 12,
    seed: int = 0,
    ema: bool = True,
    verbose: bool = True,
) -> dict:
    """Sample every digit class at every grid of `grids` from the run's newest checkpoint, write
    `<out>/digits_grid.png` (one row per class, sizes in tokens side by side, a caption with the
    checkpoint's step and the sampling settings) and report the fraction a
    classifier trained on real digits recognises. `out` defaults to `<run_dir>/samples`.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)

    step_dir = find_checkpoint(run_dir)
    model = load_sampling_model(step_dir, ema=ema)
    ddpm = training_ddpm(step_dir) if sampler == "ddpm" else None
    items, options, latents = draw_digits(model, grids, per_class, sampler, steps, cfg_scale, seed, ddpm)
    digits = np.stack([latent_to_digit(latent) for latent in latents])
    predicted = digits_classifier().predict(digits.reshape(len(digits), 64))
    labels = np.array([item.label for item in items])
    recognised = float((predicted == labels).mean())
    caption = grid_caption(
        options, extrapolation_name(model.config), int(step_dir.name.split("-")[-1]), size_unit="tokens"
    )
    grid = class_size_grid(items, preview_latents(latents, 0), caption=caption, size_unit="tokens", scale=4)
    grid_path = out / "digits_grid.png"
    save_png(grid, grid_path)
    per_grid = {
        f"{rows}x{cols}": float(
            (predicted == labels)[
                [i for i, it in enumerate(items) if (it.rows, it.cols) == (rows, cols)]
            ].mean()
        )
        for rows, cols in grids
    }
    summary = {"recognised": recognised, "images": len(items), "per_grid": per_grid, "grid": str(grid_path)}
    if verbose:
        sizes = ", ".join(f"{k}: {v:.0%}" for k, v in per_grid.items())
        print(
            f"{recognised:.0%} of {len(items)} generated digits recognised by a classifier trained on real digits "
            f"({sizes}); grid in {grid_path}"
        )
    return summary
