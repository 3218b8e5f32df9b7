"""Resuming with an edited config: allowed edits take effect from the first resumed step and are
reported; an edit of a field that may not change is refused before anything is loaded.

One process, the tiny model, 6 steps with a checkpoint at 3 (`tests/helpers/train_worker.py`), then resumes.
The expected learning rates are the closed form of warmup + cosine decay, computed here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers.train_runs import BASE, metric_records, run
from helpers.train_worker import worker_config

from fitscale.config import ConfigError, load_config
from fitscale.train.resume import check_before_start

pytestmark = pytest.mark.slow

SCHEDULE = ["optim.schedule.name=cosine", "optim.schedule.warmup_steps=2"]
FIRST = ["train.steps=6", "checkpoint.interval=3", "checkpoint.keep_last=0", "optim.lr=2e-3", *SCHEDULE]


def cosine_lr(base: float, step: int, total: int, warmup: int = 2) -> float:
    """The rate logged after optimizer step `step` (1-based), i.e. the one of 0-based step `step`:
    linear warmup, then cosine to 0 at the last step (and 0 after it)."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min((step - warmup) / (total - warmup - 1), 1.0)))


def events(run_dir: Path, name: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record.get("event") == name]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    """6 steps, checkpoints at 3 and 6; the test copies step 3 into a folder of its own."""
    run_dir = tmp_path_factory.mktemp("first") / "run"
    run(run_dir, 1, *FIRST)
    return run_dir


def copy_at_step_3(first_run: Path, tmp_path: Path) -> Path:
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(first_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-6")
    return run_dir


def test_edited_lr_steps_and_schedule_take_effect_from_the_first_resumed_step(first_run, tmp_path):
    run_dir = copy_at_step_3(first_run, tmp_path)
    result = run(run_dir, 1, *FIRST, "optim.lr=1e-4", "train.steps=9", "optim.schedule.warmup_steps=1")
    lrs = {step: record["lr"] for step, record in metric_records(run_dir).items()}
    assert [lrs[s] for s in range(1, 4)] == pytest.approx([cosine_lr(2e-3, s, 6) for s in range(1, 4)])
    assert [lrs[s] for s in range(4, 10)] == pytest.approx([cosine_lr(1e-4, s, 9, 1) for s in range(4, 10)])
    changed = [(e["step"], e["field"], e["old"], e["new"]) for e in events(run_dir, "config_changed")]
    assert changed == [
        (3, "train.steps", 6, 9),
        (3, "optim.lr", 2e-3, 1e-4),
        (3, "optim.schedule.warmup_steps", 2, 1),
    ]
    assert "event=config_changed step=3 field=optim.lr old=0.002 new=0.0001" in result.stderr


REFUSED = {
    "train.seed=1": "train.seed was 0 and is now 1 (every step's noise and label dropout are drawn from it)",
    "model.overrides.depth=3": "model.depth was 2 and is now 3 (the checkpoint's weights belong to that network)",
    "data.path=other": "data.path was 'unused' and is now 'other' (the saved data position indexes that dataset)",
    "optim.ema.enabled=false": (
        "optim.ema.enabled was True and is now False (the checkpoint holds an EMA only when it was on)"
    ),
}


def refusal(run_dir: Path, edit: str) -> str:
    return (
        f"cannot resume {run_dir / 'checkpoints' / 'step-3'} with this config: {REFUSED[edit]}. Set it back to "
        "resume, or start a new run with another train.run_dir"
    )


def test_the_trainer_refuses_an_edit_that_may_not_change_before_anything_is_loaded(first_run, tmp_path):
    run_dir = copy_at_step_3(first_run, tmp_path)
    before = (run_dir / "metrics.jsonl").read_text()
    result = run(run_dir, 1, *FIRST, "train.seed=1", expect_kill=True)
    assert f"ConfigError: {refusal(run_dir, 'train.seed=1')}" in result.stderr
    assert (run_dir / "metrics.jsonl").read_text() == before, "a refused resume must not write"


@pytest.mark.parametrize("edit", list(REFUSED))
def test_fitscale_train_refuses_an_edit_that_may_not_change_before_any_rank_starts(first_run, edit):
    """The check `fitscale train` and `fitscale launch` run first, on the worker's own config."""
    config = load_config(None, [*worker_config(first_run), *BASE, *FIRST, "train.resume=3", edit])
    with pytest.raises(ConfigError) as error:
        check_before_start(config)
    assert str(error.value) == refusal(first_run, edit)


def test_fields_that_may_change_pass_the_check(first_run):
    worker = [*worker_config(first_run), *BASE, "model.overrides.attn_backend=grouped", "log.every=5"]
    edits = [
        "train.grad_clip=0.5",
        "optim.ema.decay=0.5",
        "checkpoint.interval=7",
        "data.global_batch_size=4",
    ]
    changes = check_before_start(load_config(None, [*worker, *FIRST, *edits, "optim.beta2=0.95"]))
    assert [str(change) for change in changes] == [
        "model.attn_backend 'reference' -> 'grouped'",
        "data.global_batch_size 256 -> 4",
        "train.grad_clip 1.0 -> 0.5",
        "optim.beta2 0.999 -> 0.95",
        "optim.ema.decay 0.9999 -> 0.5",
        "checkpoint.interval 3 -> 7",
        "log.every 1 -> 5",
    ]
