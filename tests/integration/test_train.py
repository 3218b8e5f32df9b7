"""Acceptance runs of the Trainer: real processes (torchrun, gloo), the tiny model, a few steps."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("train_worker.py")
BASE = ["log.wandb=disabled", "log.every=1"]
pytestmark = pytest.mark.slow


def run(run_dir: Path, nproc: int, *overrides: str, expect_kill: bool = False, **options) -> None:
    command = [sys.executable]
    if nproc > 1:
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += [str(WORKER), str(run_dir)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    command += ["--set", *BASE, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    if expect_kill:
        assert result.returncode != 0, "the run was expected to die"
    else:
        assert result.returncode == 0, result.stderr[-4000:]


def losses(run_dir: Path, name: str = "history.json") -> list[float]:
    return [record["loss"] for record in json.loads((run_dir / name).read_text())]


def checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, gathered in one process (model, optimizer, EMA, ...)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = run_dir / f"full-{step}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step-{step}", target)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)

    walk("", torch.load(target, weights_only=False))
    return flat


def test_fsdp_run_killed_and_resumed_is_bit_identical(tmp_path):
    steps = ["train.steps=6", "checkpoint.interval=2"]
    run(tmp_path / "whole", 2, *steps)
    die_at = random.Random().choice([3, 4, 5])
    interrupted = tmp_path / "interrupted"
    run(interrupted, 2, *steps, die_at=die_at, expect_kill=True)
    assert (interrupted / "checkpoints" / f"step-{die_at - die_at % 2}").is_dir()
    run(interrupted, 2, *steps, history="history-resumed.json")
    expected = checkpoint_tensors(tmp_path / "whole", 6)
    actual = checkpoint_tensors(interrupted, 6)
    assert any(key.startswith("model.") for key in expected)
    assert any(key.startswith("optimizer.") for key in expected)
    assert any(key.startswith("ema.") for key in expected)
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), f"{key} differs after resuming from a kill at step {die_at}"
    assert losses(interrupted, "history-resumed.json") == losses(tmp_path / "whole")[die_at - die_at % 2 :]


@pytest.mark.parametrize("nproc", [1, 4])
def test_checkpoint_of_two_ranks_resumes_on_other_world_sizes(tmp_path, nproc):
    source = tmp_path / "two"
    run(source, 2, "train.steps=2", "checkpoint.interval=2")
    resumed = tmp_path / f"on{nproc}"
    shutil.copytree(source, resumed)
    run(resumed, nproc, "train.steps=3", "checkpoint.interval=2", history="history-resumed.json")
    history = json.loads((resumed / "history-resumed.json").read_text())
    assert [record["step"] for record in history] == [3]
    before = checkpoint_tensors(source, 2)
    after = checkpoint_tensors(resumed, 3)
    name = (
        "model.x_embedder.proj.weight"
        if "model.x_embedder.proj.weight" in before
        else next(k for k in before if k.startswith("model.") and k.endswith("weight"))
    )
    assert not torch.equal(before[name], after[name]), "training did not continue"


def test_single_process_and_fsdp_agree(tmp_path):
    common = [
        "train.steps=3",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "optim.ema.enabled=false",
    ]
    run(tmp_path / "single", 1, *common)
    run(tmp_path / "fsdp", 2, *common)
    reference = losses(tmp_path / "single")
    assert len(reference) == 3
    assert losses(tmp_path / "fsdp") == pytest.approx(reference, rel=1e-5)


@pytest.mark.skip(
    reason="the DeepSpeed ZeRO-3 backend hangs after engine initialisation on CPU; under investigation"
)
def test_deepspeed_zero3_agrees_with_single_process(tmp_path):
    common = [
        "train.steps=3",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "optim.ema.enabled=false",
    ]
    run(tmp_path / "single", 1, *common)
    run(tmp_path / "zero3", 2, *common, "parallel.backend=deepspeed", "parallel.zero_stage=3")
    assert losses(tmp_path / "zero3") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)


def test_same_images_split_differently_give_the_same_loss_and_update(tmp_path):
    common = ["train.steps=2", "checkpoint.interval=2", "optim.ema.enabled=false"]
    run(tmp_path / "interleaved", 2, *common, split="interleave", micro_batches=2)
    run(tmp_path / "uneven", 2, *common, split="contiguous", first=3, micro_batches=1)
    run(tmp_path / "one_rank", 1, *common, micro_batches=3)
    reference = losses(tmp_path / "interleaved")
    weights = checkpoint_tensors(tmp_path / "interleaved", 2)
    for name in ("uneven", "one_rank"):
        assert losses(tmp_path / name) == pytest.approx(reference, rel=1e-5), name
        other = checkpoint_tensors(tmp_path / name, 2)
        for key, tensor in weights.items():
            if key.startswith("model."):
                torch.testing.assert_close(other[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
