"""`fitscale status RUN`: where a run stands, from its folder alone (no torch, answers at once).

Step reached and target (of the live branch: fitscale.train.records), the newest complete
checkpoint, the checkpoints kept from abandoned branches (`checkpoints/superseded/`), whether a
live process holds the run lock (fitscale.train.lock), the last logged metrics and their age, an
ETA at the current segment's pace, restarts (requeues and resumes: the start events of
metrics.jsonl) and submissions (`launch.jsonl`), and the newest sample grid.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fitscale.checkpoint.layout import complete_steps, step_dirname, superseded_steps
from fitscale.report.history import RunHistory, format_number, read_history
from fitscale.runtime.failures import last_failure
from fitscale.runtime.rundir import launch_records
from fitscale.train.lock import RunLock
from fitscale.train.loglines import format_duration

SHOWN_METRICS = (
    "loss",
    "grad_norm",
    "lr",
    "perf/images_per_s",
    "perf/real_tokens_per_s",
    "perf/mfu",
    "val_loss",
    "val_loss_ema",
)


def _target_steps(run_dir: Path) -> int | None:
    """train.steps of the run's resolved config.yaml (None when it has none yet)."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        return int(config["train"]["steps"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def _checkpoint_folder(run_dir: Path) -> Path:
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        return run_dir / config["checkpoint"]["folder"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return run_dir / "checkpoints"


def eta_seconds(history: RunHistory, target: int | None) -> float | None:
    """Seconds to `target` at the pace of the newest segment (None without two records)."""
    if target is None or not history.segments:
        return None
    records = history.segments[-1].records
    if len(records) < 2:
        return None
    first, last = records[0], records[-1]
    if last["time"] <= first["time"] or last["step"] <= first["step"]:
        return None
    pace = (last["time"] - first["time"]) / (last["step"] - first["step"])
    return max(0, target - last["step"]) * pace


def run_status(run_dir: str | Path, now: float | None = None) -> dict[str, Any]:
    """Everything `fitscale status` prints, as a JSON-ready dict. FileNotFoundError names a folder
    that is not a run folder."""

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    now = time.time() if now is None else now
    lock = RunLock(run_dir)
    alive = lock.held()
    try:
        history = read_history(run_dir)
    except FileNotFoundError:
        if lock.holder() is None and not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(
                f"{run_dir}: not a run folder (no metrics.jsonl, config.yaml or .lock); pass a train.run_dir"
            ) from None
        history = RunHistory(run_dir, [], [])
    folder = _checkpoint_folder(run_dir)
    checkpoints = complete_steps(folder) if folder.is_dir() else []
    steps = history.steps()
    last = steps[max(steps)] if steps else None
    target = _target_steps(run_dir)
    grids = sorted((run_dir / "samples").glob("step-*.png"), key=lambda p: int(p.stem.split("-")[1]))
    status = {
        "run": str(run_dir),
        "alive": alive,
        "holder": lock.holder(),
        "step": history.last_step(),
        "steps": target,
        "checkpoint": str(folder / step_dirname(checkpoints[-1])) if checkpoints else None,
        "checkpoint_step": checkpoints[-1] if checkpoints else None,
        "superseded": superseded_steps(folder),
        "last_metrics": {k: last[k] for k in SHOWN_METRICS if last is not None and last.get(k) is not None},
        "last_metrics_age_s": (now - last["time"]) if last is not None and "time" in last else None,
        "eta_s": eta_seconds(history, target) if alive is not False else None,
        "restarts": max(0, len(history.segments) - 1),
        "launches": len(launch_records(run_dir)),
        "samples": str(grids[-1]) if grids else None,
    }
    if alive is False:
        failure = last_failure(run_dir)
        since = last["time"] if last is not None and "time" in last else 0.0
        if failure is not None and failure["time"] >= since:  # not an error a later run got past
            status["last_error"] = failure["message"]  # the line the launcher printed
    last_val = next((r for r in reversed(list(steps.values())) if "val_loss" in r), None)
    if last_val is not None:
        status["last_validation"] = {
            "step": last_val["step"],
            "val_loss": last_val["val_loss"],
            "val_loss_ema": last_val.get("val_loss_ema"),
        }
    return status


def format_status(status: dict[str, Any]) -> str:
    """The human-readable lines of a `run_status` dict: state, progress, checkpoint, last metrics and
    their age, ETA, restarts.
    """

    holder = status["holder"] or {}
    who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
    if status["alive"] is True:
        state = f"running ({who})"
    elif status["alive"] is None:
        state = f"unknown: the lock was last taken by {who}, another host; check there or the metrics' age"
    else:
        state = "not running"
    step, target = status["step"], status["steps"]
    progress = f"{format_number(step)} / {format_number(target)}"
    if step is not None and target:
        progress += f" ({100 * step / target:.1f}%)"
    age = status["last_metrics_age_s"]
    metrics = " ".join(f"{k.split('/')[-1]}={format_number(v)}" for k, v in status["last_metrics"].items())
    lines = [
        f"run: {status['run']}",
        f"state: {state}",
        f"step: {progress}",
        f"checkpoint: {status['checkpoint'] or 'none complete'}",
        *(
            f"superseded (an abandoned branch, kept): {branch}: steps {', '.join(map(str, steps)) or '-'}"
            for branch, steps in status.get("superseded", {}).items()
        ),
        f"last metrics: {metrics or '-'}" + (f" ({format_duration(age)} ago)" if age is not None else ""),
    ]
    if "last_validation" in status:
        v = status["last_validation"]
        lines.append(
            f"last validation: step {v['step']} val_loss={format_number(v['val_loss'])} "
            f"val_loss_ema={format_number(v['val_loss_ema'])}"
        )
    eta = status["eta_s"]
    lines.append(f"eta: {format_duration(eta) if eta is not None else '-'}")
    lines.append(f"restarts: {status['restarts']} (resumes and requeues); launches: {status['launches']}")
    if status["samples"]:
        lines.append(f"samples: {status['samples']}")
    if status.get("last_error"):
        lines.append(f"last error: {status['last_error']}")
    return "\n".join(lines)
