"""Resuming from an earlier checkpoint starts a new branch: the later checkpoints are moved aside
whole (never rewritten, never kept as if new), `train.resume=auto` and retention see only the
live branch, and reports read only its records.

One process, the tiny model (`tests/helpers/train_worker.py`): 8 steps at lr 2e-3 with a checkpoint every 2
(steps 2, 4, 6, 8), then resumes from step 2 at lr 1e-3. Before, `checkpoints/step-4` and
`step-6` of the first run stayed in place (`already exists; not writing it again`) while steps
3-6 were trained again, and `resume=auto` went on from the old weights.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.train_runs import checkpoint_tensors, run

from fitscale.report.history import read_history
from fitscale.report.status import format_status, run_status

pytestmark = pytest.mark.slow

FIRST = ["train.steps=8", "checkpoint.interval=2", "checkpoint.keep_last=0", "optim.lr=2e-3"]
BRANCH = ["train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=0", "optim.lr=1e-3"]


def digests(folder: Path) -> dict[str, str]:
    """md5 of every file below `folder`, by relative path."""
    return {
        str(path.relative_to(folder)): hashlib.md5(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def saved_lr(run_dir: Path, step: int, folder: str = "checkpoints") -> float:
    return json.loads((run_dir / folder / f"step-{step}" / "fitscale.json").read_text())["config"]["optim"][
        "lr"
    ]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def live_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("first") / "run"
    run(run_dir, 1, *FIRST)
    return run_dir


@pytest.fixture(scope="module")
def branched(first_run, tmp_path_factory) -> tuple[Path, str]:
    """A copy of the first run resumed with `train.resume=2 optim.lr=1e-3` to step 6; its stderr."""
    run_dir = tmp_path_factory.mktemp("branched") / "run"
    shutil.copytree(first_run, run_dir)
    result = run(run_dir, 1, *BRANCH, "train.resume=2")
    return run_dir, result.stderr


def test_resume_from_an_earlier_step_moves_every_later_checkpoint_aside_whole(first_run, branched):
    run_dir, stderr = branched
    aside = run_dir / "checkpoints" / "superseded" / "from-step-2-attempt-2"
    assert sorted(p.name for p in aside.iterdir()) == [
        "step-4",
        "step-6",
        "step-8",
    ]  # step 8: past the new end
    for step in (4, 6, 8):
        assert digests(aside / f"step-{step}") == digests(first_run / "checkpoints" / f"step-{step}")
        assert saved_lr(run_dir, step, "checkpoints/superseded/from-step-2-attempt-2") == 2e-3
    assert live_steps(run_dir) == [2, 4, 6]
    assert saved_lr(run_dir, 4) == saved_lr(run_dir, 6) == 1e-3  # written by the new branch
    assert "already exists" not in stderr
    assert f"event=branch step=2 resumed_from=2 superseded='[4, 6, 8]' moved_to={aside}" in stderr
    branch = [r for r in records(run_dir) if r.get("event") == "branch"]
    assert [(r["step"], r["superseded"], r["moved_to"]) for r in branch] == [(2, [4, 6, 8], str(aside))]
    starts = [(r["step"], r["attempt"]) for r in records(run_dir) if r.get("event") == "start"]
    assert starts == [(0, 1), (2, 2)]
    written = [r for r in records(run_dir) if r.get("event") == "checkpoint"][-2:]
    assert [(r["step"], r["path"]) for r in written] == [
        (s, str(run_dir / "checkpoints" / f"step-{s}")) for s in (4, 6)
    ]


def test_resume_auto_after_a_branch_continues_the_new_weights_exactly(first_run, branched, tmp_path):
    """The branch resumed by `auto` to step 8 (keeping only the newest checkpoint) equals one
    uninterrupted run of the new branch from step 2 to 8, bit for bit; the abandoned checkpoints
    survive retention, and `fitscale status` and `report` follow the live branch."""
    run_dir = tmp_path / "run"
    shutil.copytree(branched[0], run_dir)
    aside = run_dir / "checkpoints" / "superseded" / "from-step-2-attempt-2"
    before = digests(aside)
    result = run(run_dir, 1, *BRANCH, "train.steps=8", "checkpoint.keep_last=1")
    assert f"event=resume step=6 checkpoint={run_dir / 'checkpoints' / 'step-6'}" in result.stderr
    assert "event=branch" not in result.stderr
    assert live_steps(run_dir) == [8]
    assert digests(aside) == before

    straight = tmp_path / "straight"
    shutil.copytree(first_run / "checkpoints" / "step-2", straight / "checkpoints" / "step-2")
    run(straight, 1, *BRANCH, "train.steps=8")
    expected, actual = checkpoint_tensors(straight, 8), checkpoint_tensors(run_dir, 8)
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), f"{key} differs from the uninterrupted new branch"
    history = read_history(run_dir)
    steps, losses = history.series("loss")
    straight_steps, straight_losses = read_history(straight).series("loss")
    assert steps == list(range(1, 9)) and straight_steps == list(range(3, 9))
    assert losses[2:] == straight_losses  # steps 3-8: the new branch's, not the first run's
    assert history.series("lr")[1] == [2e-3] * 2 + [1e-3] * 6
    status = run_status(run_dir)
    assert (status["step"], status["checkpoint_step"], status["restarts"]) == (8, 8, 2)
    assert status["superseded"] == {"from-step-2-attempt-2": [4, 6, 8]}
    assert "superseded (an abandoned branch, kept): from-step-2-attempt-2: steps 4, 6, 8" in format_status(
        status
    )


def test_a_branch_of_a_branch_keeps_both_abandoned_branches(first_run, branched, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(branched[0], run_dir)
    first_aside = run_dir / "checkpoints" / "superseded" / "from-step-2-attempt-2"
    before = digests(first_aside)
    second_branch_step_6 = digests(run_dir / "checkpoints" / "step-6")
    result = run(run_dir, 1, *BRANCH, "optim.lr=5e-4", "train.resume=4")
    aside = run_dir / "checkpoints" / "superseded" / "from-step-4-attempt-3"
    assert f"event=branch step=4 resumed_from=4 superseded=[6] moved_to={aside}" in result.stderr
    assert digests(aside / "step-6") == second_branch_step_6
    assert digests(first_aside) == before
    assert live_steps(run_dir) == [2, 4, 6] and saved_lr(run_dir, 6) == 5e-4
    history = read_history(run_dir)
    assert history.series("lr") == (list(range(1, 7)), [2e-3] * 2 + [1e-3] * 2 + [5e-4] * 2)
    assert [s.start_step for s in history.segments] == [0, 2, 4]
    status = run_status(run_dir)
    assert status["step"] == 6
    assert status["superseded"] == {"from-step-2-attempt-2": [4, 6, 8], "from-step-4-attempt-3": [6]}


def test_a_requeued_job_started_with_resume_s_continues_its_branch(branched, tmp_path, monkeypatch):
    """A SLURM requeue (or torchrun restart) runs the job's config again, `train.resume=2` included.
    Before, each restart resumed from step 2 again and moved its own branch's checkpoints aside
    (`superseded/from-step-2-attempt-3`), redoing its steps at every preemption."""
    run_dir = tmp_path / "run"
    shutil.copytree(branched[0], run_dir)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    result = run(run_dir, 1, *BRANCH, "train.resume=2", "train.steps=8")
    assert "its branch reached step-6, resuming from there" in result.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints" / "superseded").iterdir()) == [
        "from-step-2-attempt-2"
    ]
    assert live_steps(run_dir) == [2, 4, 6, 8]
    starts = [(r["step"], r["attempt"]) for r in records(run_dir) if r.get("event") == "start"]
    assert starts == [(0, 1), (2, 2), (6, 3)]
    # A user's own second `train.resume=2` (no restart) still starts another branch.
    monkeypatch.delenv("SLURM_RESTART_COUNT")
    run(run_dir, 1, *BRANCH, "train.resume=2", "train.steps=4")
    assert sorted(p.name for p in (run_dir / "checkpoints" / "superseded").iterdir()) == [
        "from-step-2-attempt-2",
        "from-step-2-attempt-4",
    ]
