"""metrics.jsonl as records: whole lines on append (a torn last line is finished first), torn lines
skipped with a warning naming file and line, attempts counted, and the live branch of a run."""

from __future__ import annotations

import json
import warnings

import pytest

from fitscale.config import load_config
from fitscale.config.log import LogConfig
from fitscale.train.cli import summary_line
from fitscale.train.metrics import MetricsLogger
from fitscale.train.records import (
    TornRecordWarning,
    last_attempt,
    live_branch,
    live_records,
    next_attempt,
    read_records,
)

QUIET = dict(wandb="disabled", progress_bar="off", console="off")


def start(step, attempt=None):
    return {"event": "start", "step": step, **({"attempt": attempt} if attempt else {})}


def steps(*numbers, **values):
    return [{"step": n, **values} for n in numbers]


def shape(records):
    return [(r.get("event", "-"), r["step"], r.get("loss")) for r in records]


def test_a_resume_after_a_crash_supersedes_the_steps_done_again():
    records = [start(0), *steps(1, 2, 3, 4, loss=1.0), start(2), *steps(3, 4, 5, loss=0.5)]
    assert shape(live_branch(records)) == [
        ("start", 0, None),
        ("-", 1, 1.0),
        ("-", 2, 1.0),
        ("start", 2, None),
        ("-", 3, 0.5),
        ("-", 4, 0.5),
        ("-", 5, 0.5),
    ]


def test_a_fresh_start_after_an_attempt_that_saved_nothing_supersedes_all_its_steps():
    """The case of a user: 26 steps, no checkpoint, then a rerun of 3 steps."""
    dead = [start(0, 1), *steps(*range(1, 27), loss=9.0), {"event": "validation", "step": 20}]
    records = dead + [start(0, 2), *steps(1, 2, 3, loss=1.0)]
    live = live_branch(records)
    assert shape(live) == [("start", 0, None), ("start", 0, None), *(("-", n, 1.0) for n in (1, 2, 3))]
    assert last_attempt(records) == (3, None)


def test_branches_of_branches_and_late_checkpoint_events():
    """An asynchronous checkpoint's event comes after later steps (it is logged once published);
    a start at 4 keeps it, a start at 2 supersedes it. Every start record is kept (restarts count)."""
    records = [
        start(0, 1),
        *steps(1, 2, 3, 4, 5, 6, loss=1.0),
        {"event": "checkpoint", "step": 4, "path": "c/step-4"},
        start(4, 2),
        *steps(5, 6, 7, loss=2.0),
        start(2, 3),
        *steps(3, loss=3.0),
        {"event": "checkpoint", "step": 3, "path": "c/step-3"},
    ]
    live = live_branch(records)
    assert [r.get("attempt") for r in live if r.get("event") == "start"] == [1, 2, 3]
    assert [(r["step"], r["loss"]) for r in live if "loss" in r] == [(1, 1.0), (2, 1.0), (3, 3.0)]
    assert last_attempt(records) == (3, "c/step-3")
    assert last_attempt(records[:-3]) == (7, None)  # attempt 2 wrote no checkpoint; step-4 was attempt 1's


def test_torn_lines_are_skipped_with_a_warning_naming_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "start", "step": 0}\n{"step": 1, "loss": 0.5}\n{"step": 2, "lo\n[1, 2]\n\n')
    with pytest.warns(TornRecordWarning) as caught:
        records = read_records(path)
    assert [r["step"] for r in records] == [0, 1]
    assert [str(w.message) for w in caught] == [
        f"{path}:3: skipped a line that is not a whole metrics record (cut short by a crash?)",
        f"{path}:4: skipped a line that is not a whole metrics record (cut short by a crash?)",
    ]


def test_a_start_after_a_torn_last_line_writes_its_records_on_lines_of_their_own(tmp_path):
    """Before, the next start's record was glued to the torn line and lost with it."""
    first = MetricsLogger(tmp_path, LogConfig(**QUIET), rank=0)
    first.log(1, {"loss": 0.5})
    first.close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as handle:
        handle.write('{"step": 2, "loss": 0.')  # killed in the middle of a write
    resumed = MetricsLogger(tmp_path, LogConfig(**QUIET), rank=0, start_step=1)
    resumed.log(2, {"loss": 0.25})
    resumed.close()
    with pytest.warns(TornRecordWarning, match=r"metrics.jsonl:3: "):
        records = read_records(path)
    assert [(r.get("event"), r["step"], r.get("attempt")) for r in records] == [
        ("start", 0, 1),
        (None, 1, None),
        ("start", 1, 2),
        (None, 2, None),
    ]
    assert path.read_text().endswith("\n")
    assert next_attempt(path) == 3 and next_attempt(tmp_path / "none.jsonl") == 1


def test_every_record_is_one_whole_line(tmp_path):
    logger = MetricsLogger(tmp_path, LogConfig(**QUIET), rank=0)
    long_value = "x" * 100_000  # far beyond any buffer: still one line
    logger.event("samples", 1, path=long_value)
    logger.log(1, {"loss": 1.0})
    logger.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line).get("event") for line in lines] == ["start", "samples", None]


def closing_line(tmp_path, records, checkpoints=()):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for step in checkpoints:  # complete checkpoints of earlier attempts
        folder = run_dir / "checkpoints" / f"step-{step}"
        folder.mkdir()
        (folder / ".metadata").write_text("")
        (folder / "fitscale.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = load_config("recipes/demo.yaml", [f"train.run_dir={run_dir}"])
    return summary_line(config, None), run_dir


def test_the_closing_line_names_the_step_reached_and_only_a_checkpoint_this_run_wrote(tmp_path):
    resumed = [start(0, 1), *steps(1, 2, 3), {"event": "checkpoint", "step": 3, "path": "P/step-3"}]
    resumed += [start(3, 2), *steps(4, 5)]  # resumed from 3; saved nothing
    line, run_dir = closing_line(tmp_path, resumed, checkpoints=[3])
    assert (
        line == f"fitscale train: done at step 5; no checkpoint written; metrics: {run_dir / 'metrics.jsonl'}"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r["step"] for r in live_records(run_dir) if "event" not in r] == [1, 2, 3, 4, 5]
