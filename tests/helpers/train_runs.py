"""Helpers of the trainer integration tests: start `train_worker.py` runs and read what they left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("train_worker.py")
BASE = ["log.wandb=disabled", "log.every=1"]


def launch_command(run_dir: Path, nproc: int, *overrides: str, **options) -> list[str]:
    command = [sys.executable]
    if nproc > 1:
        command += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command += [str(WORKER), str(run_dir)]
    for key, value in options.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    return command + ["--set", *BASE, *overrides]


def run(
    run_dir: Path, nproc: int, *overrides: str, expect_kill: bool = False, **options
) -> subprocess.CompletedProcess:
    """Train with `nproc` processes; asserts success (or failure when `expect_kill`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        launch_command(run_dir, nproc, *overrides, **options),
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    if expect_kill:
        assert result.returncode != 0, "the run was expected to die"
    else:
        assert result.returncode == 0, result.stderr[-4000:]
    return result


def write_digits_split(out: Path, images: int = 12) -> Path:
    """A small held-out split for `data.val_path`: the first `images` digits, rendered with seed 1."""
    from fitscale.data.sources import build_digits
    from fitscale.data.writer import WriteSettings, write_dataset

    build, _ = build_digits(seed=1, dtype="float32")
    settings = WriteSettings(writer="digits", num_classes=10, options={"dtype": "float32", "seed": 1})
    write_dataset(out, [(digit, 0) for digit in range(images)], build, settings, progress=False)
    return out


def losses(run_dir: Path, name: str = "history.json") -> list[float]:
    return [record["loss"] for record in json.loads((run_dir / name).read_text())]


def metric_records(run_dir: Path) -> dict[int, dict]:
    """The last metrics record of each step in `metrics.jsonl` (events left out)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "event" not in record:
            records[record["step"]] = record
    return records


def checkpoint_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every value of a DCP checkpoint, gathered in one process (model, optimizer, EMA, RNG, data
    position, counters, per-rank RNG blobs), flattened to dotted keys; numbers become 0-d tensors so all compare alike."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = run_dir / f"full-{step}.pt"
    if not target.is_file():
        dcp_to_torch_save(run_dir / "checkpoints" / f"step-{step}", target)
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, (bool, int, float)):
            flat[prefix] = torch.tensor(value)
        elif isinstance(value, bytes):  # a per-rank blob (RNG states)
            flat[prefix] = torch.frombuffer(bytearray(value), dtype=torch.uint8)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)

    walk("", torch.load(target, weights_only=False))
    return flat


def model_weights(tensors: dict[str, torch.Tensor], section: str = "model") -> dict[str, torch.Tensor]:
    """`model.<name>` (or `ema.params.<name>`) entries of `checkpoint_tensors`, keyed by parameter name."""
    prefix = "ema.params." if section == "ema" else f"{section}."
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
