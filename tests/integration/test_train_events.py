"""Every event the README lists (`start`, `resume`, `checkpoint`, `validation`, `samples`,
`nonfinite_step_skipped`, `stop`) is a record of metrics.jsonl, not only a log line, and
`event=checkpoint` of an asynchronous save comes once the checkpoint is complete on disk.

One process, the tiny model (`tests/helpers/train_worker.py`): 6 steps with a NaN image in step 2, validation
and a sample grid every 2 steps, asynchronous checkpoints every 2, a SIGTERM during step 4's
validation (the run saves and stops there); then a resume to step 6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.train_runs import run, write_digits_split

from fitscale.train.loglines import parse_fields

pytestmark = pytest.mark.slow

README_EVENTS = {"start", "resume", "checkpoint", "validation", "samples", "nonfinite_step_skipped", "stop"}
COMMON = [
    "train.steps=6",
    "checkpoint.interval=2",
    "checkpoint.async_save=true",
    "train.val_every=2",
    "train.sample_every=2",
    "train.sample_labels=[1]",
    "train.sample_grids=[2x2]",
    "train.sample_steps=1",
]


@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("events")
    run_dir = root / "run"
    common = [*COMMON, f"data.val_path={write_digits_split(root / 'val', images=4)}"]
    first = run(run_dir, 1, *common, nan_steps="1", signal_at=4)  # 0-based step 1 is step 2
    second = run(run_dir, 1, *common)
    return run_dir, [first.stderr, second.stderr]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_every_listed_event_is_a_record_of_metrics_jsonl_and_a_log_line(stopped_and_resumed):
    run_dir, stderr = stopped_and_resumed
    events = [(r["event"], r["step"]) for r in records(run_dir) if "event" in r]
    assert {name for name, _ in events} >= README_EVENTS, events
    logged = [parse_fields(line) for text in stderr for line in text.splitlines() if " event=" in line]
    assert {(fields["event"], int(fields["step"])) for fields in logged} >= set(events)
    assert ("stop", 4) in events and ("resume", 4) in events and ("nonfinite_step_skipped", 2) in events
    assert [s for name, s in events if name == "validation"] == [2, 4, 6]
    stop = next(r for r in records(run_dir) if r.get("event") == "stop")
    assert stop["signal"] == "SIGTERM" and stop["checkpoint"] == str(run_dir / "checkpoints" / "step-4")


def test_an_async_checkpoint_is_announced_only_once_it_is_complete(stopped_and_resumed):
    """Before, `event=checkpoint` was written as soon as the save was staged, before its folder
    (and its fitscale.json, written last) existed."""
    run_dir, _ = stopped_and_resumed
    announced = [r for r in records(run_dir) if r.get("event") == "checkpoint"]
    assert [r["step"] for r in announced] == [2, 4, 6]
    for record in announced:
        path = Path(record["path"])
        assert path == run_dir / "checkpoints" / f"step-{record['step']}"
        assert record["time"] >= (path / "fitscale.json").stat().st_mtime, record
