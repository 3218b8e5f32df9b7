"""An exit signal stops a `sweep launch --local`: the current run saves its checkpoint, later runs do not start."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def default_signals() -> None:
    """Start the child with SIGTERM's and SIGINT's default actions, as a shell does, whatever this
    process inherited (a background job of a non-interactive shell ignores SIGINT)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def write_sweep(tmp_path: Path, budgets: str, widths: tuple[int, ...] = (16, 24)) -> tuple[Path, Path]:
    """A --local sweep of tiny widths on 32 synthetic images; returns (spec, out_dir)."""
    data = tmp_path / "synth"
    subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "data", "synth", str(data), "--num-images", "32",
         "--num-classes", "10", "--no-progress"],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    models = "".join(
        f"  - {{name: w{w}, preset: tiny, overrides: {{hidden_size: {w}, num_heads: 2, adaln_lora_rank: 4}}}}\n"
        for w in widths
    )
    spec, out = tmp_path / "sweep.yaml", tmp_path / "sweep"
    spec.write_text(
        f"name: signal\nrecipe: recipes/demo.yaml\nout_dir: {out}\nmode: grid\nmodels:\n{models}"
        f"budgets: {budgets}\nglobal_batch_size: 4\ntokens_per_image: 36\n"
        f"overrides: [data.path={data}, data.num_classes=10, parallel.sharding=none, checkpoint.interval=0, "
        "log.every=1]\n"
    )
    return spec, out


def launch(spec: Path, *extra: str) -> subprocess.Popen:
    """`fitscale sweep launch SPEC --local --json` in a child with default signal actions."""
    return subprocess.Popen(
        [sys.executable, "-m", "fitscale.cli", "sweep", "launch", str(spec), "--local", "--json", *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals,
    )  # fmt: skip


def wait_for(text: str, path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """Until `path` holds `text` (the child still running)."""
    deadline = time.monotonic() + timeout
    while not (path.is_file() and text in path.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)


def test_sigterm_stops_the_whole_local_sweep_and_a_relaunch_continues_it(tmp_path):
    spec, out = write_sweep(tmp_path, "[1.0e+10]")
    metrics = out / "w16-C1e10" / "metrics.jsonl"
    sweep = launch(spec)
    wait_for('"step": 2', metrics, sweep)
    os.kill(sweep.pid, signal.SIGTERM)
    stdout, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 128 + signal.SIGTERM, stderr
    assert json.loads(stdout) == {"w16-C1e10": "stopped by SIGTERM", "w24-C1e10": "not started"}
    assert "sweep signal: SIGTERM stopped w16-C1e10 and 1 later runs; launch again to continue" in stderr
    assert not (out / "w24-C1e10").exists()
    saved = sorted((out / "w16-C1e10" / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    # Launching again continues the stopped run from that checkpoint (not from step 0).
    step = int(saved[0].name.removeprefix("step-"))
    relaunch = launch(spec, "--only", "w16-C1e10")
    wait_for(f'"event": "resume", "step": {step},', metrics, relaunch)
    relaunch.send_signal(signal.SIGINT)
    stdout, _ = relaunch.communicate(timeout=120)
    assert relaunch.returncode == 128 + signal.SIGINT
    assert json.loads(stdout) == {"w16-C1e10": "stopped by SIGINT"}


def test_ctrl_c_as_a_run_finishes_stops_the_sweep_before_the_next_run(tmp_path):
    """The signal lands after the first run's last step: in its trainer's closing, between runs, or
    while the second run is built; whichever, the first run counts as finished and no later run trains
    to its end."""
    spec, out = write_sweep(tmp_path, "[1.0e+9]", widths=(16, 24, 32))
    sweep = launch(spec)
    wait_for('"event": "checkpoint"', out / "w16-C1e09" / "metrics.jsonl", sweep)
    sweep.send_signal(signal.SIGINT)
    stdout, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 128 + signal.SIGINT, stderr
    outcome = json.loads(stdout)
    assert outcome["w16-C1e09"] == "local" and outcome["w32-C1e09"] == "not started", outcome
    assert outcome["w24-C1e09"] in ("stopped by SIGINT before it started", "stopped by SIGINT"), outcome
    assert "Exception ignored" not in stderr and not (out / "w32-C1e09").exists()
