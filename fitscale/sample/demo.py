"""The demo's closing pictures: class-conditional digits at several aspect ratios, and a check
that a classifier trained on the real digits recognises them.

The digits dataset (fitscale.data.sources.render_digit) draws each 8x8 digit, scaled up with
its aspect kept, into the centre square of latent channel 0 as 2 * ink - 1. `latent_to_digit`
undoes exactly that: channel 0 back to ink in [0, 1], the centre square, an area-average down to
8x8 and the 0..16 scale of scikit-learn's digits, which is what the classifier was trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fitscale.flow.samplers import FIXED_GRID
from fitscale.sample.generate import generate_latents, load_sampling_model
from fitscale.sample.options import SamplingOptions
from fitscale.sample.pictures import image_grid, save_png
from fitscale.sample.plan import SampleItem

# Grids (rows, cols) in tokens for digits trained at 4..16 tokens a side: square, wide, tall, large.
DEMO_GRIDS = ((8, 8), (6, 12), (12, 6), (14, 14))


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
    `<out>/digits_grid.png` (one row per class, sizes side by side) and report the fraction a
    classifier trained on real digits recognises. `out` defaults to `<run_dir>/samples`.
    """
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "samples"
    out.mkdir(parents=True, exist_ok=True)
    model = load_sampling_model(run_dir, ema=ema)
    classes = model.config.num_classes
    items: list[SampleItem] = []
    for label in range(classes):
        for rows, cols in grids:
            for _ in range(per_class):
                items.append(SampleItem(len(items), label, rows, cols))
    steps_or_none = steps if sampler in FIXED_GRID else None  # adaptive samplers pick their own steps
    options = SamplingOptions(
        sampler=sampler, steps=steps_or_none, cfg_scale=cfg_scale, seed=seed, token_budget=8192
    )
    latents = generate_latents(model, items, options)
    digits = np.stack([latent_to_digit(latent) for latent in latents])
    predicted = digits_classifier().predict(digits.reshape(len(digits), 64))
    labels = np.array([item.label for item in items])
    recognised = float((predicted == labels).mean())
    pictures = [((np.clip(latent[0].numpy(), -1, 1) + 1) * 127.5).astype(np.uint8) for latent in latents]
    pictures = [np.repeat(p[:, :, None], 3, axis=2) for p in pictures]
    grid_path = out / "digits_grid.png"
    save_png(image_grid(pictures, columns=len(grids) * per_class), grid_path, scale=4)
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
