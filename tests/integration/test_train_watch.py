"""Watching a run: the demo recipe on one process with stderr not a terminal writes key=value log
lines (steps, validation, checkpoints, sample grids), draws the asked sample grids, and trains
exactly as the same run without grids (every checkpointed tensor equal, losses equal);
`fitscale report` plots the two runs and `fitscale status` reads one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.train_runs import checkpoint_tensors, metric_records, write_digits_split

from fitscale.train.loglines import parse_fields

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "train.steps=4",
    "log.every=2",
    "checkpoint.interval=2",
    "hooks.after=[]",
    "launch.tasks_per_node=1",
    "train.val_every=2",
    "train.val_max_images=8",
]
GRIDS = [
    "train.sample_every=3",
    "train.sample_labels=[0,3]",
    "train.sample_grids=[4x4,4x8,10x10]",
    "train.sample_steps=2",
]


def train_demo(data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    overrides = [f"data.path={data}", f"train.run_dir={run_dir}", *COMMON, *extra]
    result = subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "train", "recipes/demo.yaml", "--set", *overrides],
        capture_output=True,  # stderr is a pipe, as under SLURM: no progress bar
        text=True,
        timeout=400,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("watch")
    val = f"data.val_path={write_digits_split(root / 'val', images=8)}"
    with_grids = train_demo(root / "digits", root / "grids", val, *GRIDS)
    plain = train_demo(root / "digits", root / "plain", val)
    return {
        "grids": root / "grids",
        "plain": root / "plain",
        "stderr": with_grids.stderr,
        "plain_err": plain.stderr,
    }


def lines(stderr: str) -> list[dict[str, str]]:
    return [parse_fields(line) for line in stderr.splitlines() if " INFO fitscale.train: " in line]


def test_log_lines_carry_the_step_fields_and_events(runs):
    records = lines(runs["stderr"])
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == ["2/4", "4/4"]
    for record in steps:
        assert set(record) == {
            "step",
            "loss",
            "grad_norm",
            "lr",
            "images_per_s",
            "real_tokens_per_s",
            "mfu",
            "peak_mem_gib",
            "data_wait_s",
            "eta",
        }
        assert float(record["loss"]) > 0 and float(record["images_per_s"]) > 0
        assert record["mfu"] == "-"  # a CPU has no known peak
    logged = metric_records(runs["grids"])
    assert float(steps[-1]["loss"]) == pytest.approx(logged[4]["loss"], rel=1e-3)
    events = [(r["event"], r["step"]) for r in records if "event" in r]
    assert events == [
        ("start", "0"),
        ("validation", "2"),
        ("checkpoint", "2"),
        ("samples", "3"),
        ("validation", "4"),
        ("samples", "4"),
        ("checkpoint", "4"),
    ]
    samples = [r for r in records if r.get("event") == "samples"]
    assert all(float(r["seconds"]) > 0 for r in samples)
    assert samples[0]["path"] == str(runs["grids"] / "samples" / "step-3.png")


def test_grids_are_written_at_the_asked_steps(runs):
    from PIL import Image

    folder = runs["grids"] / "samples"
    assert sorted(p.name for p in folder.iterdir()) == ["step-3.png", "step-4.png"]
    image = Image.open(folder / "step-4.png")
    # 2 rows of classes, 3 columns; the 10x10-token column (20x20 latent pixels) is upscaled 3x
    assert image.width > 3 * 60 and image.height > 2 * 60
    assert not (runs["plain"] / "samples").exists()


def test_grids_leave_training_bit_identical(runs):
    with_grids, plain = checkpoint_tensors(runs["grids"], 4), checkpoint_tensors(runs["plain"], 4)
    assert sorted(with_grids) == sorted(plain)
    for key, value in plain.items():
        assert torch.equal(with_grids[key], value), key
    assert any(key.startswith("ema.params.") for key in plain)
    losses = {
        run: [r["loss"] for _, r in sorted(metric_records(runs[run]).items())] for run in ("grids", "plain")
    }
    assert losses["grids"] == losses["plain"]


def test_report_plots_and_summarises_both_runs(runs, tmp_path, capsys):
    from fitscale.cli import main

    out = tmp_path / "report"
    assert main(["report", str(runs["grids"]), str(runs["plain"]), "--out", str(out), "--json"]) == 0
    summaries = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in out.glob("*.png")) == [
        "loss.png",
        "optim.png",
        "throughput.png",
        "timesteps.png",
    ]
    assert all(p.stat().st_size > 10_000 for p in out.glob("*.png"))
    for summary, name in zip(summaries, ("grids", "plain")):
        logged = {step: r["val_loss"] for step, r in metric_records(runs[name]).items() if "val_loss" in r}
        assert sorted(logged) == [2, 4]
        assert summary["best_val_loss"] == min(logged.values())
        assert (summary["step"], summary["restarts"]) == (4, 0)
    assert (
        (out / "summary.txt").read_text().startswith(f"{runs['grids']}: step 4, 1 segment(s), 0 restart(s)")
    )


def test_status_of_a_finished_run(runs, capsys):
    from fitscale.cli import main

    assert main(["status", str(runs["grids"]), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["alive"] is False
    assert (status["step"], status["steps"], status["checkpoint_step"]) == (4, 4, 4)
    assert status["checkpoint"] == str(runs["grids"] / "checkpoints" / "step-4")
    assert status["samples"] == str(runs["grids"] / "samples" / "step-4.png")
