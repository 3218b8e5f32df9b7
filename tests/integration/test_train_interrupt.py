"""Ctrl-C on a real 2-rank `fitscale train` of the demo recipe, and its closing line.

The launcher forwards SIGINT to each rank (each in its own session); the first one finishes the
step, saves a checkpoint and stops with status 130, a second one stops at once and says how many
steps are lost. `fitscale status` and `fitscale report` then count only the live branch: after a
rerun from scratch, the steps of the attempt that saved nothing are no longer the run's."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["log.every=1", "checkpoint.interval=0", "hooks.after=[]", "launch.tasks_per_node=2"]


def command(data: Path, run_dir: Path, *extra: str) -> list[str]:
    overrides = [f"data.path={data}", f"train.run_dir={run_dir}", *COMMON, *extra]
    return [sys.executable, "-m", "fitscale.cli", "train", "recipes/demo.yaml", "--set", *overrides]


def environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train(data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command(data, run_dir, *extra),
        capture_output=True,
        text=True,
        timeout=400,
        cwd=ROOT,
        env=environment(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def wait_for(path: Path, pattern: str, process: subprocess.Popen, timeout: float = 300) -> re.Match:
    """The first match of `pattern` in the file `path` (the run's stderr), polled every 10 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, path.read_text())
        if match:
            return match
        assert process.poll() is None, path.read_text()[-4000:]
        time.sleep(0.01)
    raise AssertionError(f"{pattern!r} never appeared in {path}")


def interrupted(tmp_path: Path, run_dir: Path, times: int, *extra: str) -> tuple[int, str, str]:
    """Start a long 2-rank run, press Ctrl-C `times` times once step 5 is logged (the second only
    after the ranks said they heard the first); returns (exit status, stdout, stderr)."""
    err_file, out_file = tmp_path / f"{run_dir.name}.err", tmp_path / f"{run_dir.name}.out"
    with open(err_file, "w") as err, open(out_file, "w") as out:
        process = subprocess.Popen(
            command(tmp_path / "digits", run_dir, "train.steps=5000", *extra),
            stdout=out, stderr=err, cwd=ROOT, env=environment(),
        )  # fmt: skip
        try:
            wait_for(err_file, r"step=5/5000", process)
            process.send_signal(signal.SIGINT)  # what the terminal sends the launcher on Ctrl-C
            if times == 2:
                wait_for(err_file, r"interrupted: finishing step", process)
                process.send_signal(signal.SIGINT)
            code = process.wait(timeout=120)
        finally:
            if process.poll() is None:
                process.kill()
    return code, out_file.read_text(), err_file.read_text()


def status(run_dir: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "status", str(run_dir), "--json"],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=environment(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ctrl_c_saves_a_checkpoint_stops_with_130_and_the_rerun_resumes_it(tmp_path):
    run_dir = tmp_path / "once"
    code, out, err = interrupted(tmp_path, run_dir, 1)
    assert code == 130, err[-4000:]
    saved = int(re.search(r"interrupted: checkpoint step-(\d+) saved; run again to resume", err).group(1))
    last_logged = max(int(s) for s in re.findall(r"step=(\d+)/5000", err))
    assert saved == last_logged >= 5
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{saved}"]
    stop = [r for r in records(run_dir) if r.get("event") == "stop"]
    assert [(r["step"], r["signal"]) for r in stop] == [(saved, "SIGINT")]
    assert "done at" not in out and "Traceback" not in err
    # A stop the user asked for, with its checkpoint saved, is no error of the run.
    assert "last_error" not in status(run_dir)

    result = train(tmp_path / "digits", run_dir, f"train.steps={saved + 2}")
    assert (
        f"event=resume step={saved} checkpoint={run_dir / 'checkpoints' / f'step-{saved}'}" in result.stderr
    )
    assert result.stdout.strip().splitlines()[-1] == (
        f"fitscale train: done at step {saved + 2}; checkpoint: {run_dir / 'checkpoints' / f'step-{saved + 2}'}; "
        f"metrics: {run_dir / 'metrics.jsonl'}"
    )
    now = status(run_dir)
    assert (now["step"], now["steps"], now["restarts"]) == (saved + 2, saved + 2, 1)


def test_second_ctrl_c_stops_at_once_and_status_and_report_count_only_the_rerun(tmp_path):
    """The case of a user: Ctrl-C (here twice, so nothing is saved), then a rerun with
    `train.steps=3`. Before, `fitscale status` said `step: 26 / 3 (866.7%)` with the dead attempt's
    last metrics, and `fitscale report`'s final loss came from the abandoned steps."""
    run_dir = tmp_path / "twice"
    code, out, err = interrupted(tmp_path, run_dir, 2, "data.global_batch_size=256")
    assert code == 130, err[-4000:]
    lost = re.search(
        r"interrupted again: stopping at once without saving; (\d+) step\(s\) since the start are lost", err
    )
    assert lost and int(lost.group(1)) >= 5, err[-4000:]
    assert not list((run_dir / "checkpoints").glob("step-*"))
    dead_steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert max(dead_steps) >= 5

    result = train(tmp_path / "digits", run_dir, "train.steps=3", "data.global_batch_size=256")
    assert "event=resume" not in result.stderr  # nothing was saved: a fresh start
    new_losses = [r["loss"] for r in records(run_dir) if "loss" in r][len(dead_steps) :]
    assert len(new_losses) == 3
    now = status(run_dir)
    assert (now["step"], now["steps"], now["restarts"]) == (3, 3, 1)
    assert now["last_metrics"]["loss"] == new_losses[-1]

    report = subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "report", str(run_dir), "--out", str(tmp_path / "report"), "--json"],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=environment(),
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    summary = json.loads(report.stdout)[0]
    assert summary["step"] == 3 and summary["restarts"] == 1
    assert summary["final_train_loss"] == pytest.approx(sum(new_losses) / 3)


def test_a_two_rank_run_without_checkpoints_names_the_step_it_reached(tmp_path):
    """Before: `fitscale train: done at step ?; checkpoint: none written` (the parent of the ranks
    looked only at checkpoints)."""
    run_dir = tmp_path / "plain"
    result = train(tmp_path / "digits", run_dir, "train.steps=2", "checkpoint.save_at_end=false")
    assert result.stdout.strip().splitlines()[-1] == (
        f"fitscale train: done at step 2; no checkpoint written; metrics: {run_dir / 'metrics.jsonl'}"
    )
