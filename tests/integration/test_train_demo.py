"""The README's main command, shortened: `fitscale train recipes/demo.yaml` on a fresh checkout.

The real CLI prepares the digits dataset, starts the recipe's 2 ranks (FSDP over gloo, the
Streaming loader at mixed sizes), and ends with one line naming the checkpoint and the metrics.
The closing samples have their own test (test_demo_samples.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_recipe_prepares_its_data_and_trains_on_two_ranks(tmp_path):
    data, run_dir = tmp_path / "digits", tmp_path / "run"
    overrides = [f"data.path={data}", f"train.run_dir={run_dir}", "train.steps=2", "hooks.after=[]"]
    # a sample grid at the end, drawn by both ranks from the FSDP-sharded EMA
    overrides += [
        "train.sample_every=2",
        "train.sample_labels=[1]",
        "train.sample_grids=[4x4]",
        "train.sample_steps=1",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "train", "recipes/demo.yaml", "--set", *overrides],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((data / "fitscale.json").read_text())["num_samples"] == 7188
    last = result.stdout.strip().splitlines()[-1]
    assert last == (
        f"fitscale train: done at step 2; checkpoint: {run_dir / 'checkpoints' / 'step-2'}; "
        f"metrics: {run_dir / 'metrics.jsonl'}"
    )
    assert result.stdout.count("fitscale train: done") == 1
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "event" not in record]
    assert [record["step"] for record in steps] == [1, 2]
    assert all(record["images"] == 32 and record["loss"] > 0 for record in steps)
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == ["step-2.png"]
