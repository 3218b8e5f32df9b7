"""REPA composed with everything a GPU run turns on (skipped without CUDA; float8 needs torchao and
compute capability 8.9+): bf16 compute, compiled blocks and float8 token linears on one GPU train a
few steps with finite flow and alignment losses; the projector is checkpointed and not exported."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers.repa import (
    TINY_VIT,
    assert_projector_checkpointed_not_exported,
    encoder_file,
    repa_overrides,
    write_worker_pixels,
)

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

STEPS = 3


def float8_gpu() -> bool:
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def train_repa(root: Path, device: str, *extra: str) -> tuple[list[dict], Path]:
    """`STEPS` in-process REPA steps of the tiny model on `device` (bf16 compute, compiled blocks,
    float8 token linears, static padded shapes); (history records, run folder)."""
    from helpers.train_worker import SeededSteps, worker_config

    from fitscale.config import load_config
    from fitscale.train.trainer import Trainer

    data = write_worker_pixels(root / "data", images=8 * STEPS)
    weights = encoder_file(root / "tiny.safetensors", "vit_tiny_patch16_224", **TINY_VIT)
    run_dir = root / "run"
    config = load_config(
        None,
        [
            *worker_config(run_dir),
            *repa_overrides(data, weights),
            f"train.device={device}",
            "log.wandb=disabled",
            "log.every=1",
            f"train.steps={STEPS}",
            "checkpoint.interval=0",
            "checkpoint.save_at_end=true",
            "parallel.param_dtype=bf16",
            "parallel.compile=true",
            "parallel.float8=tensorwise",
            "parallel.float8_size_filter=false",  # the tiny model's linears are below torchao's thresholds
            "data.pad_to_budget=true",
            "data.token_budget=256",
            *extra,
        ],
    )
    trainer = Trainer(config, loader=SeededSteps(0, 1, 8, 1, 10, pad_to=256))
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer.history, run_dir


@pytest.mark.skipif(not float8_gpu(), reason="needs torchao and an SM89+ GPU")
def test_repa_with_bf16_compile_and_float8_trains_and_keeps_the_projector_out_of_the_export(tmp_path):
    records, run_dir = train_repa(tmp_path, "cuda", "model.overrides.attn_backend=auto")
    assert len(records) == STEPS
    for record in records:
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]), record
        assert -1.0 <= record["repa_loss"] <= 1.0, record
    assert_projector_checkpointed_not_exported(run_dir, STEPS, tmp_path / "w.safetensors")
