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


def test_sigterm_stops_the_whole_local_sweep_and_a_relaunch_continues_it(tmp_path):
    data = tmp_path / "synth"
    subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "data", "synth", str(data), "--num-images", "32",
         "--num-classes", "10", "--no-progress"],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    spec = tmp_path / "sweep.yaml"
    out = tmp_path / "sweep"
    spec.write_text(
        f"""
name: signal
recipe: recipes/demo.yaml
out_dir: {out}
mode: grid
models:
  - {{name: w16, preset: tiny, overrides: {{hidden_size: 16, num_heads: 2, adaln_lora_rank: 4}}}}
  - {{name: w24, preset: tiny, overrides: {{hidden_size: 24, num_heads: 2, adaln_lora_rank: 6}}}}
budgets: [1.0e+10]
global_batch_size: 4
tokens_per_image: 36
overrides: [data.path={data}, data.num_classes=10, parallel.sharding=none, checkpoint.interval=0, log.every=1]
"""
    )
    sweep = subprocess.Popen(
        [sys.executable, "-m", "fitscale.cli", "sweep", "launch", str(spec), "--local", "--json"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=default_signals,
    )  # fmt: skip
    metrics = out / "w16-C1e10" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and '"step": 2' in metrics.read_text()):
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.communicate()
        time.sleep(0.2)
    os.kill(sweep.pid, signal.SIGTERM)
    stdout, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 128 + signal.SIGTERM, stderr
    assert json.loads(stdout) == {"w16-C1e10": "stopped by SIGTERM", "w24-C1e10": "not started"}
    assert "sweep signal: SIGTERM stopped w16-C1e10 (checkpoint saved) and 1 later runs" in stderr
    assert not (out / "w24-C1e10").exists()
    saved = sorted((out / "w16-C1e10" / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    # Launching again continues the stopped run from that checkpoint (not from step 0).
    step = int(saved[0].name.removeprefix("step-"))
    relaunch = subprocess.Popen(
        [sys.executable, "-m", "fitscale.cli", "sweep", "launch", str(spec), "--local", "--json",
         "--only", "w16-C1e10"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_signals,
    )  # fmt: skip
    while f'"event": "resume", "step": {step},' not in metrics.read_text():
        assert relaunch.poll() is None and time.monotonic() < deadline + 60, relaunch.communicate()
        time.sleep(0.2)
    relaunch.send_signal(signal.SIGINT)
    stdout, _ = relaunch.communicate(timeout=120)
    assert relaunch.returncode == 128 + signal.SIGINT
    assert json.loads(stdout) == {"w16-C1e10": "stopped by SIGINT"}
