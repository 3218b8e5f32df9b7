"""Helpers of the SLURM tests: submitting runs, reading their metrics, logs and final weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "cluster" / "local_slurm.sh"
HELD_JOB = Path(__file__).resolve().parent / "held_job"  # its sitecustomize.py holds a job's first attempt

# Every run of these tests trains the same tiny model on the same data, so any two final
# checkpoints must be bit-identical however the runs were interrupted.
RUN_STEPS = 48
RUN_SETTINGS = [
    f"train.steps={RUN_STEPS}",
    "data.global_batch_size=8",
    "data.token_budget=1024",
    "checkpoint.interval=12",
    "checkpoint.keep_last=2",
    "log.every=1",
]


def fitscale_launch(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "launch", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def held_until_signalled(step: int) -> dict[str, str]:
    """The environment of a job whose first attempt takes `step` steps, then waits for a signal.

    SLURM passes the submitter's environment to the job; `held_job/sitecustomize.py` reads it.
    """
    path = os.pathsep.join(p for p in (str(HELD_JOB), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "FITSCALE_TEST_HOLD_AT_STEP": str(step)}


def run_overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--set", f"data.path={data}", f"train.run_dir={run_dir}", *RUN_SETTINGS, *extra]


def scontrol_job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_until(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            steps.append(record["step"])
    return steps


def start_steps(run_dir: Path) -> list[int]:
    """The step each start of the run began from: [0] for one go, [0, k] after one resume at step k."""
    return [e["step"] for e in metric_events(run_dir) if e["event"] == "start"]


def metric_events(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "event" in record]


def final_model_state(run_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The model weights of the newest complete checkpoint, read back from DCP into plain tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    steps = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert steps, f"no complete checkpoint in {run_dir / 'checkpoints'}"
    out = tmp_path / f"{run_dir.name}-step{steps[-1]}.pt"
    dcp_to_torch_save(run_dir / "checkpoints" / f"step-{steps[-1]}", out)
    state = torch.load(out, weights_only=False)
    return {"step": steps[-1], **{f"model.{k}": v for k, v in state["model"].items()},
            **{f"ema.{k}": v for k, v in state.get("ema", {}).items() if isinstance(v, torch.Tensor)}}  # fmt: skip


def assert_same_weights(got: dict, want: dict) -> None:
    assert got["step"] == want["step"] == RUN_STEPS
    assert got.keys() == want.keys()
    different = [name for name in want if name != "step" and not torch.equal(got[name], want[name])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


def job_logs(run_dir: Path, job_id: str) -> str:
    return "\n".join(
        p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob(f"{job_id}_*_log.*"))
    )
