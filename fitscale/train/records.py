"""`metrics.jsonl` as a file of records: written whole, read back with torn lines skipped, and
reduced to the live branch of the run.

A run folder's `metrics.jsonl` is appended to by every start of the run (an attempt): first a
`{"event": "start", "step": S, "attempt": A}` record (S = 0 for a fresh start, the checkpoint's
step for a resume), then one record per step and the events. An attempt that resumes from step S
abandons whatever earlier attempts logged after S: those steps are trained again (after a crash)
or differently (an explicit `train.resume=S`), and a fresh start from 0 after an attempt that
died before its first checkpoint abandons every step before it. `live_branch` is the one place
that rule is written; `fitscale report`, `fitscale status`, `fitscale sweep collect` and the
trainer's closing line all read the run through it.

Each record is one `write` of one whole line. A crash can still cut the last line short; the next
start finishes that line with a newline before it appends (`open_for_append`), so its own
records are never glued to the torn one, and readers skip an undecodable line with one warning
naming the file and line number (`read_records`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from fitscale.diskspace import CheckedAppendFile

METRICS_FILE = "metrics.jsonl"
METRICS_FULL_FIX = "free space there, or point train.run_dir at a larger filesystem"
START_EVENT = "start"


class TornRecordWarning(UserWarning):
    """A line of a metrics file is not a whole JSON record (cut short by a crash); it was skipped."""


def open_for_append(path: str | Path) -> CheckedAppendFile:
    """Open `path` for appending records, unbuffered (each `write_record` is one write call); a full
    disk while opening or writing is one `OutOfSpaceError` naming the file and the fix.

    When the file does not end with a newline (its last record was cut short by a crash), a
    newline is written first, so the next record starts a line of its own.
    """
    handle = CheckedAppendFile(path, "the metrics log", METRICS_FULL_FIX)
    if os.path.getsize(path) > 0:
        with open(path, "rb") as reader:
            reader.seek(-1, os.SEEK_END)
            if reader.read(1) != b"\n":
                handle.write("\n")
    return handle


def write_record(handle: CheckedAppendFile, record: dict[str, Any]) -> None:
    """Append `record` as one JSON line with a single write (retried only for the unwritten rest)."""
    handle.write(json.dumps(record) + "\n")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics file in file order, each a dict with an integer `step`.

    A line that is not such a record (cut short by a crash, or damaged) is skipped with a
    TornRecordWarning naming the file and the line number; blank lines are skipped silently.
    FileNotFoundError when `path` does not exist.
    """
    records = []
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                warnings.warn(
                    f"{path}:{number}: skipped a line that is not a whole metrics record (cut short by a crash?)",
                    TornRecordWarning,
                    stacklevel=2,
                )
                continue
            records.append(record)
    return records


def is_start(record: dict[str, Any]) -> bool:
    """Whether `record` is the start record of an attempt."""
    return record.get("event") == START_EVENT


def live_branch(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the run's live branch, in file order.

    A start record at step S supersedes every earlier record with a step above S (so a fresh
    start, S = 0, supersedes every earlier step record). The start records themselves are all
    kept, whatever their step, so that attempts and restarts are still counted.
    """
    live: list[dict[str, Any]] = []
    highest = -1  # the highest step among the kept non-start records
    for record in records:
        if is_start(record) and highest > record["step"]:
            live = [r for r in live if is_start(r) or r["step"] <= record["step"]]
            highest = max((r["step"] for r in live if not is_start(r)), default=-1)
        live.append(record)
        if not is_start(record):
            highest = max(highest, record["step"])
    return live


def next_attempt(path: str | Path) -> int:
    """The number of the next attempt of a run: 1 + the start records in its metrics file (1
    without a file). Reads the file as a stream, looking only at lines that mention a start."""
    path = Path(path)
    if not path.is_file():
        return 1
    starts = 0
    marker = f'"event": "{START_EVENT}"'.encode()
    with open(path, "rb") as handle:
        for line in handle:
            if marker in line:
                try:
                    starts += is_start(json.loads(line))
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    continue
    return starts + 1


def live_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The live branch of `<run_dir>/metrics.jsonl` (read_records, then live_branch)."""
    return live_branch(read_records(Path(run_dir) / METRICS_FILE))


def last_attempt(records: list[dict[str, Any]]) -> tuple[int | None, str | None]:
    """(the step the live branch reached, the newest checkpoint the last attempt published) of a
    run's records; None for a step when nothing was logged, None for a checkpoint when the last
    attempt wrote none (a checkpoint it resumed from is not one it wrote)."""
    live = live_branch(records)
    starts = [index for index, record in enumerate(live) if is_start(record)]
    ours = live[starts[-1] :] if starts else live
    steps = [record["step"] for record in ours] + [r["step"] for r in live if not is_start(r)]
    checkpoints = [r for r in ours if r.get("event") == "checkpoint" and r.get("path")]
    return (max(steps) if steps else None), (checkpoints[-1]["path"] if checkpoints else None)
