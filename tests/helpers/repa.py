"""REPA runs of the tests (tests/integration/test_train_repa.py, tests/gpu/test_repa_gpu.py): pixel side
files for the train worker's seeded images, a timm encoder's random weights in a local file (nothing
is downloaded), and the train.repa overrides that use them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TINY_VIT = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}


def write_worker_pixels(out: Path, images: int, pixels_per_token: int = 8) -> Path:
    """Random pixels on the grid of each of the worker's first `images` sample ids."""
    from fitscale.data.pixels import write_pixels
    from helpers.train_worker import SeededSteps

    steps = SeededSteps(0, 1, 8, 1, 10)
    rng = np.random.default_rng(0)
    pictures = []
    for sample_id in range(images):
        _, (rows, cols), _ = steps.image(sample_id)
        pictures.append(
            (
                sample_id,
                rng.integers(0, 256, (rows * pixels_per_token, cols * pixels_per_token, 3), dtype=np.uint8),
                None,
            )
        )
    out.mkdir(parents=True, exist_ok=True)
    write_pixels(out, pictures, pixels_per_token)
    return out


def encoder_file(out: Path, name: str, **args) -> Path:
    """timm's `name` (with `args`) at seed 0, its state dict saved as safetensors at `out`."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))
    return out


def repa_overrides(data: Path, weights: Path, name: str = "vit_tiny_patch16_224", args=TINY_VIT) -> list[str]:
    """The train.repa overrides aligning block 1 of the tiny model with encoder `name` from `weights`."""
    return [
        f"data.path={data}",
        f"train.repa.encoder={name}",
        f"train.repa.encoder_weights={weights}",
        "train.repa.block=1",
        "train.repa.projector_width=32",
        "model.overrides.class_dropout_prob=0.0",
        *[f"train.repa.encoder_args.{key}={value}" for key, value in args.items()],
    ]


def history(run_dir: Path, name: str = "history.json") -> list[tuple[float, float, float]]:
    """(flow loss, alignment loss or None, gradient norm) of each step a worker run recorded."""
    return [(r["loss"], r.get("repa_loss"), r["grad_norm"]) for r in json.loads((run_dir / name).read_text())]


def assert_projector_checkpointed_not_exported(run_dir: Path, step: int, export_to: Path) -> None:
    """The checkpoint of `step` holds the projector (hidden_head) and no encoder tensor; the weights
    exported from it (to `export_to`) hold no projector."""
    from safetensors.torch import load_file

    from fitscale.checkpoint.export import export_checkpoint
    from helpers.train_runs import checkpoint_tensors

    tensors = checkpoint_tensors(run_dir, step)
    assert any(key.startswith("model.hidden_head.") for key in tensors), "no projector in the checkpoint"
    assert not any("patch_embed" in key or "encoder" in key for key in tensors), (
        "the encoder was checkpointed"
    )
    export_checkpoint(run_dir, export_to, ema=True)
    exported = load_file(str(export_to))
    assert exported and not any(key.startswith("hidden_head.") for key in exported)
