"""One-line log records for cluster logs: a step line every `log.every` steps and event lines.

Under SLURM (or `> log`) stderr is not a terminal, the progress bar turns itself off and these
lines take its place (`log.console`). Every line is Python `logging` output of the
`fitscale.train` logger on rank 0, and its message is `key=value` pairs separated by spaces
(values with spaces are double-quoted), so `grep`/`awk` or `parse_fields` read it back:

    2026-11-30 10:02:11 INFO fitscale.train: step=400/1600 loss=0.4183 grad_norm=0.2671 lr=0.002
        images_per_s=221.4 real_tokens_per_s=9876 mfu=0.412 peak_mem_gib=0.81 data_wait_s=0.021 eta=0:05:12
    2026-11-30 10:02:12 INFO fitscale.train: event=checkpoint step=400 path=runs/demo/checkpoints/step-400

The step line follows torchtitan's (loss, grad norm, lr, throughput, MFU, memory, ETA); the
events are the records `MetricsLogger.event` also writes to metrics.jsonl (start, resume, branch,
checkpoint, validation, samples, nonfinite_step_skipped, stop, config changes).
"""

from __future__ import annotations

import datetime
import logging
import math
import shlex
import sys
import time
from collections.abc import Mapping
from typing import Any

LOGGER_NAME = "fitscale.train"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"

logger = logging.getLogger(LOGGER_NAME)

# metrics.jsonl key -> step-line key, in the order the line shows them (those present are shown).
STEP_FIELDS = (
    ("loss", "loss"),
    ("repa_loss", "repa_loss"),
    ("grad_norm", "grad_norm"),
    ("lr", "lr"),
    ("perf/images_per_s", "images_per_s"),
    ("perf/real_tokens_per_s", "real_tokens_per_s"),
    ("perf/mfu", "mfu"),
    ("mem/max_allocated_gib", "peak_mem_gib"),
    ("mem/max_rss_gib", "peak_mem_gib"),
    ("perf/data_wait_s", "data_wait_s"),
    ("encoder_s", "encoder_s"),
)


def configure_console(rank: int) -> None:
    """Show the `fitscale` loggers' INFO lines on stderr on rank 0 only (idempotent).

    Other ranks keep warnings and errors; their info lines would repeat rank 0's. When the process
    already logs somewhere (a root handler: `logging.basicConfig` in a launcher, a test's capture),
    the lines go there instead of a second handler, so nothing prints twice.
    """
    package = logging.getLogger("fitscale")
    if rank != 0:
        package.setLevel(logging.WARNING)
        return
    package.setLevel(logging.INFO)
    ours = any(getattr(handler, "_fitscale_console", False) for handler in package.handlers)
    if not ours and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
        handler._fitscale_console = True  # type: ignore[attr-defined]
        package.addHandler(handler)


def format_value(value: Any) -> str:
    """A value as it appears after `key=`: floats to 4 significant digits, None as `-`."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    text = str(value)
    return shlex.quote(text) if not text or any(c.isspace() or c in "\"'" for c in text) else text


def format_fields(fields: Mapping[str, Any]) -> str:
    """`key=value key=value ...` in the mapping's order."""
    return " ".join(f"{key}={format_value(value)}" for key, value in fields.items())


def parse_fields(line: str) -> dict[str, str]:
    """The `key=value` pairs of a log line's message (anything before `: ` is the prefix), as strings."""
    message = line.split(": ", 1)[1] if ": " in line else line
    return dict(token.split("=", 1) for token in shlex.split(message) if "=" in token)


def log_event(name: str, step: int | None = None, **fields: Any) -> None:
    """One `event=NAME step=N key=value ...` line on the `fitscale.train` logger.

    Callers run on every rank; `configure_console` keeps the line to rank 0.
    """
    record: dict[str, Any] = {"event": name}
    if step is not None:
        record["step"] = step
    record.update(fields)
    logger.info(format_fields(record))


def format_duration(seconds: float) -> str:
    """Seconds as H:MM:SS (days as `1 day, H:MM:SS`, the datetime form)."""
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


class StepLine:
    """Writes the step line every `every` steps and at `total_steps`; ETA from the steps since start.

    `every` and `total_steps` match the trainer's log steps, whose records carry the throughput
    and memory numbers (`Throughput.rates`, `memory_stats`).
    """

    def __init__(self, every: int, total_steps: int | None, start_step: int = 0):
        self.every = every
        self.total_steps = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()

    def due(self, step: int) -> bool:
        """Whether `step` gets a log line: every `log.every` steps and the last step."""
        return step % self.every == 0 or step == self.total_steps

    def eta_seconds(self, step: int) -> float | None:
        """Seconds to the last step at the mean pace since this start; None before the first step or
        without a total.
        """
        done = step - self.start_step
        if self.total_steps is None or done <= 0:
            return None
        return (self.total_steps - step) * (time.perf_counter() - self.started) / done

    def fields(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The line's fields for `step` from its metrics record (missing numbers are left out)."""
        total = f"/{self.total_steps}" if self.total_steps is not None else ""
        out: dict[str, Any] = {"step": f"{step}{total}"}
        for source, key in STEP_FIELDS:
            if metrics.get(source) is not None:
                out[key] = metrics[source]
            elif key == "mfu" and "perf/images_per_s" in metrics:
                out[key] = None  # the device's peak is unknown (a CPU): shown as `mfu=-`
        if metrics.get("skipped"):
            out["skipped"] = int(metrics["skipped"])
        eta = self.eta_seconds(step)
        if eta is not None:
            out["eta"] = format_duration(eta)
        return out

    def maybe_write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log the `key=value` line of `step` when it is due."""
        if self.due(step):
            logger.info(format_fields(self.fields(step, metrics)))


def console_wanted(mode: str, progress_bar_shown: bool) -> bool:
    """Whether step lines are written: `on` always, `off` never, `auto` when no progress bar is shown."""
    return mode == "on" or (mode == "auto" and not progress_bar_shown)
