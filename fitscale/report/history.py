"""A run's history read back from its folder: `metrics.jsonl` split into the segments between
restarts, its events, and the summary numbers `fitscale report` and `fitscale status` print.

`metrics.jsonl` (fitscale.train.metrics.MetricsLogger) is appended to across restarts: each start
(attempt) writes `{"event": "start", "step": N, "attempt": A}`, then one record per step. Only
the live branch counts (fitscale.train.records.live_branch): a start from step N supersedes what
earlier attempts logged after N, so a resumed run's repeated steps, the steps of an attempt that
died before its first checkpoint and an abandoned branch are left out of every number here,
while each start still counts as a segment and restart. Lines cut short by a crash are skipped
with a warning naming the line.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitscale.train.loglines import format_duration
from fitscale.train.records import METRICS_FILE, is_start, live_branch, read_records

TRAIN_LOSS_WINDOW = 10  # logged steps averaged for the final training loss


@dataclass
class Segment:
    """What one start of the run wrote: from its start event to the next start."""

    start_step: int
    start_time: float | None
    records: list[dict[str, Any]] = field(default_factory=list)  # its step records on the live branch
    reached: tuple[int, float] | None = None  # (step, time) of the last step record it wrote at all

    @property
    def last_time(self) -> float | None:
        """Wall-clock time (Unix seconds) of the segment's last record, or of its start when it has none."""
        return self.records[-1]["time"] if self.records else self.start_time


@dataclass
class RunHistory:
    """The metrics and events of one run folder."""

    path: Path
    segments: list[Segment]
    events: list[dict[str, Any]]
    label: str = ""  # what plots call the run; the folder's name when empty

    @property
    def name(self) -> str:
        """What plots and summaries call the run: `label`, else the folder's name."""
        return self.label or self.path.name

    def steps(self) -> dict[int, dict[str, Any]]:
        """The last record of each step, in step order."""
        out: dict[int, dict[str, Any]] = {}
        for segment in self.segments:
            for record in segment.records:
                out[record["step"]] = record
        return dict(sorted(out.items()))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the steps whose last record has a finite `key`."""
        xs, ys = [], []
        for step, record in self.steps().items():
            value = record.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                xs.append(step)
                ys.append(float(value))
        return xs, ys

    def cumulative_flops(self) -> dict[int, float]:
        """Training FLOPs done by the end of each step (the per-step `flops` summed over steps)."""
        total, out = 0.0, {}
        for step, record in self.steps().items():
            total += float(record.get("flops") or 0.0)
            out[step] = total
        return out

    def last_step(self) -> int | None:
        """The highest step with a record, or None when the run logged no step."""
        steps = self.steps()
        return max(steps) if steps else None


def read_history(run_dir: str | Path) -> RunHistory:
    """Read `<run_dir>/metrics.jsonl`; FileNotFoundError names the folder when it has none."""
    path = Path(run_dir)
    metrics = path / METRICS_FILE
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{path}: no {METRICS_FILE}; pass a run folder (train.run_dir) of a run that has started"
        )
    records = read_records(metrics)
    live = {id(record) for record in live_branch(records)}
    segments: list[Segment] = []
    events: list[dict[str, Any]] = []
    for record in records:
        if "event" in record:
            if is_start(record):
                segments.append(Segment(record["step"], record.get("time")))
            if id(record) in live:
                events.append(record)
            continue
        if not segments:  # written without a start event (an older run)
            segments.append(Segment(0, record.get("time")))
        if "time" in record:
            segments[-1].reached = (record["step"], record["time"])
        if id(record) in live:
            segments[-1].records.append(record)
    return RunHistory(path, segments, events)


def time_lost_to_restarts(history: RunHistory) -> float:
    """Seconds between each segment's last record and the moment the next segment got back to that
    step: the downtime (queueing, start-up, loading) plus the steps done twice."""
    lost = 0.0
    for before, after in zip(history.segments, history.segments[1:]):
        if before.reached is None or after.start_time is None:
            continue
        reached, when = before.reached
        caught_up = next((r["time"] for r in after.records if r["step"] >= reached), after.last_time)
        lost += max(0.0, caught_up - when)
    return lost


def _median(history: RunHistory, key: str) -> float | None:
    _, values = history.series(key)
    return statistics.median(values) if values else None


def _best(history: RunHistory, key: str) -> tuple[float, int] | None:
    steps, values = history.series(key)
    return min(zip(values, steps)) if values else None


def summarize(history: RunHistory) -> dict[str, Any]:
    """The numbers of `fitscale report`'s summary for one run (None where the run has none)."""
    _, losses = history.series("loss")
    times = [r["time"] for s in history.segments for r in s.records if "time" in r]
    starts = [s.start_time for s in history.segments if s.start_time is not None]
    best = _best(history, "val_loss")
    best_ema = _best(history, "val_loss_ema")
    flops = history.cumulative_flops()
    return {
        "run": str(history.path),
        "step": history.last_step(),
        "segments": len(history.segments),
        "restarts": max(0, len(history.segments) - 1),
        "final_train_loss": statistics.fmean(losses[-TRAIN_LOSS_WINDOW:]) if losses else None,
        "best_val_loss": best[0] if best else None,
        "best_val_loss_step": best[1] if best else None,
        "best_val_loss_ema": best_ema[0] if best_ema else None,
        "best_val_loss_ema_step": best_ema[1] if best_ema else None,
        "median_images_per_s": _median(history, "perf/images_per_s"),
        "median_real_tokens_per_s": _median(history, "perf/real_tokens_per_s"),
        "median_mfu": _median(history, "perf/mfu"),
        "training_flops": max(flops.values()) if flops else None,
        "wall_seconds": (max(times) - min(starts or times)) if times else None,
        "seconds_lost_to_restarts": time_lost_to_restarts(history),
    }


def format_number(value: Any) -> str:
    """A metric for a table: '-' for None, 4 significant digits for floats, str otherwise."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for one run: best validation loss, throughput medians, time lost to restarts."""

    s = summary
    lines = [
        f"{s['run']}: step {format_number(s['step'])}, {s['segments']} segment(s), {s['restarts']} restart(s)"
    ]
    lines.append(
        f"  final train loss (mean of last {TRAIN_LOSS_WINDOW} logged): {format_number(s['final_train_loss'])}"
    )
    if s["best_val_loss"] is not None:
        lines.append(
            f"  best val loss: {format_number(s['best_val_loss'])} at step {s['best_val_loss_step']}"
            f"; EMA: {format_number(s['best_val_loss_ema'])} at step {format_number(s['best_val_loss_ema_step'])}"
        )
    else:
        lines.append("  best val loss: - (no validation logged; train.val_every)")
    lines.append(
        f"  median images/s {format_number(s['median_images_per_s'])}, real tokens/s "
        f"{format_number(s['median_real_tokens_per_s'])}, MFU {format_number(s['median_mfu'])}"
    )
    wall = s["wall_seconds"]
    lines.append(
        f"  wall time {format_duration(wall) if wall is not None else '-'}, lost to restarts "
        f"{format_duration(s['seconds_lost_to_restarts'])}, training FLOPs {format_number(s['training_flops'])}"
    )
    return "\n".join(lines)
