"""Pictures out of latents and onto disk: grey previews of one latent channel, grids of
pictures of any sizes, PNG files, and the ADM evaluation suite's `.npz` batches."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from fitscale.sample.plan import SampleItem


def preview_latents(latents: list[torch.Tensor], channel: int) -> list[np.ndarray]:
    """One latent channel in [-1, 1] as a grey uint8 (h, w, 3) picture (the digits data keep the
    image in channel 0)."""
    pictures = []
    for latent in latents:
        grey = ((latent[channel].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        pictures.append(np.repeat(grey[:, :, None], 3, axis=2))
    return pictures


def image_grid(pictures: list[np.ndarray], columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Pictures of any sizes in a grid of equal cells (each centred), uint8 (H, W, 3).

    Raises ValueError for an empty list."""
    if not pictures:
        raise ValueError("no pictures to put in a grid")
    columns = columns or math.ceil(math.sqrt(len(pictures)))
    cell_h = max(p.shape[0] for p in pictures) + pad
    cell_w = max(p.shape[1] for p in pictures) + pad
    rows = math.ceil(len(pictures) / columns)
    grid = np.full((rows * cell_h + pad, columns * cell_w + pad, 3), 255, dtype=np.uint8)
    for index, picture in enumerate(pictures):
        top = (index // columns) * cell_h + pad + (cell_h - pad - picture.shape[0]) // 2
        left = (index % columns) * cell_w + pad + (cell_w - pad - picture.shape[1]) // 2
        grid[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
    return grid


def save_png(picture: np.ndarray, path: Path, scale: int = 1) -> None:
    """Write a uint8 (H, W, 3) picture as PNG, upscaled `scale` times by nearest neighbour."""
    from PIL import Image

    image = Image.fromarray(picture)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)


def write_npz_by_size(out_dir: Path, items: list[SampleItem], pictures: list[np.ndarray]) -> list[Path]:
    """ADM evaluation-suite batches: one `samples_HxW.npz` per size, `arr_0` uint8 NHWC, `arr_1` labels."""
    written = []
    for size in sorted({(p.shape[0], p.shape[1]) for p in pictures}):
        chosen = [i for i, p in enumerate(pictures) if p.shape[:2] == size]
        path = out_dir / f"samples_{size[0]}x{size[1]}.npz"
        np.savez(
            path,
            arr_0=np.stack([pictures[i] for i in chosen]),
            arr_1=np.array([items[i].label for i in chosen], dtype=np.int64),
        )
        written.append(path)
    return written
