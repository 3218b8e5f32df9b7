"""What a one-process run prints besides its log lines: no DCP warning at a save or a load, and one
warning when the dataset is smaller than a step's batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.train_runs import write_digits_split

from fitscale.cli import main

REPO = Path(__file__).resolve().parents[2]
DCP_WARNING = "torch.distributed is disabled"


def train_args(run_dir: Path, data: Path, steps: int) -> list[str]:
    sets = [f"train.run_dir={run_dir}", f"data.path={data}", "hooks.before=[]", "hooks.after=[]",
            f"train.steps={steps}", "log.every=1"]  # fmt: skip
    return ["train", "recipes/demo.yaml", "--nproc", "1", "--set", *sets]


def train(run_dir: Path, data: Path, steps: int) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "fitscale.cli", *train_args(run_dir, data, steps)],
        cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.slow
def test_a_lone_process_saves_and_loads_quietly_and_warns_once_of_a_dataset_smaller_than_a_step(tmp_path):
    data = write_digits_split(tmp_path / "five", images=5)
    run_dir = tmp_path / "run"
    first = train(run_dir, data, steps=2)  # saves step-2 at the end
    warning = (
        f"WARNING fitscale.train: data.path={data} holds 5 usable images, fewer than data.global_batch_size=32: "
        "every step repeats each image about 6.4 times; write a larger dataset or lower data.global_batch_size"
    )
    assert [line.split(" ", 2)[2] for line in first.splitlines() if "WARNING" in line] == [warning], first
    assert DCP_WARNING not in first
    resumed = train(run_dir, data, steps=3)  # loads step-2, saves step-3
    assert "event=resume step=2" in resumed
    assert DCP_WARNING not in resumed and "UserWarning" not in resumed, resumed


def test_a_dataset_as_large_as_a_step_gets_no_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(REPO)
    data = write_digits_split(tmp_path / "digits", images=32)
    args = train_args(tmp_path / "run", data, steps=1)
    assert main([*args, "checkpoint.save_at_end=false"]) == 0
    assert not [r for r in caplog.records if "usable images" in r.getMessage()]
