"""Image folders and tiny random-weight autoencoders for the `fitscale data from-images` tests
(tests/unit/test_autoencoders.py, test_encode_ranks.py, tests/slurm/test_slurm_encode.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def autoencoder(kind: str):
    """A tiny random-weight autoencoder of `kind`: sd (KL, 4 ch), flux (KL, 16 ch, shift), dcae (DC, 32 ch)."""
    from diffusers import AutoencoderDC, AutoencoderKL

    torch.manual_seed(0)
    if kind == "dcae":
        blocks = (8, 8, 8, 8, 16, 32)  # six stages: 32x, as DC-AE f32c32
        return AutoencoderDC(
            latent_channels=32,
            attention_head_dim=8,
            encoder_block_types="ResBlock",
            decoder_block_types="ResBlock",
            encoder_block_out_channels=blocks,
            decoder_block_out_channels=blocks,
            encoder_layers_per_block=(1,) * 6,
            decoder_layers_per_block=(1,) * 6,
            encoder_qkv_multiscales=((),) * 6,
            decoder_qkv_multiscales=((),) * 6,
            scaling_factor=0.41407,
        )
    factors = {"sd": dict(scaling_factor=0.13025), "flux": dict(scaling_factor=0.3611, shift_factor=0.1159)}
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=16 if kind == "flux" else 4,
        norm_num_groups=4,
        layers_per_block=1,
        **factors[kind],
    )


def random_image_folder(root: Path, per_class: int, sides=(64, 80, 96, 128), seed: int = 0) -> Path:
    """An ImageFolder at `root` with classes a and b, `per_class` random RGB PNGs each, every side
    drawn from `sides` (pixels); `root` is returned."""
    rng = np.random.default_rng(seed)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            height, width = rng.choice(sides, 2)
            pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
