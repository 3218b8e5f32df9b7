"""CheckpointManager and branches, in one process with real DCP folders: later checkpoints moved
aside whole, a save that meets a checkpoint it did not write, `on_published` only once a checkpoint
is complete, and the first Ctrl-C turned into a save-and-stop request."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from fitscale.checkpoint import CheckpointConflictError, CheckpointManager, layout
from fitscale.config.checkpoint import CheckpointConfig


def state(step: int) -> dict:
    """What a run saves, reduced to a weight and a step counter (plain tensors DCP writes as they are)."""
    return {"weights": {"w": torch.full((64, 64), float(step)), "step": torch.tensor(step)}}


def listing(folder) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def saved_run(tmp_path, steps, **config) -> CheckpointManager:
    manager = CheckpointManager(tmp_path, CheckpointConfig(keep_last=0, **config), handle_signals=False)
    for step in steps:
        manager.save(step, state(step))
    return manager


def test_supersede_moves_every_later_checkpoint_and_retention_never_touches_them(tmp_path):
    saved_run(tmp_path, [2, 4, 6, 8])
    folder = tmp_path / "checkpoints"
    before = listing(folder)
    manager = CheckpointManager(tmp_path, CheckpointConfig(interval=1, keep_last=1), handle_signals=False)
    assert manager.load(4, state(0)) == 4
    aside, moved = manager.supersede(4, "from-step-4-attempt-2")
    assert (aside, moved) == (folder / "superseded" / "from-step-4-attempt-2", [6, 8])
    after = listing(folder)
    for step in (6, 8):  # the same files, sizes and times: moved, not rewritten
        for name, stat in before.items():
            if name.startswith(f"step-{step}/"):
                assert after[f"superseded/from-step-4-attempt-2/{name}"] == stat
    assert manager.complete_steps() == [2, 4] and manager.resume_step("auto") == 4
    for step in (5, 6, 7):  # the new branch, with keep_last=1
        manager.maybe_save(step, state(step))
    assert manager.complete_steps() == [7]
    assert sorted(p.name for p in aside.iterdir()) == ["step-6", "step-8"]
    assert layout.find_checkpoint(tmp_path) == folder / "step-7"


def test_supersede_never_reuses_a_branch_folder_and_does_nothing_without_later_steps(tmp_path):
    manager = saved_run(tmp_path, [1, 2])
    assert manager.supersede(2, "b") == (None, [])
    assert manager.supersede(1, "b") == (tmp_path / "checkpoints" / "superseded" / "b", [2])
    manager.save(2, state(2))  # the new branch's step 2... abandoned again from step 1
    manager2 = CheckpointManager(tmp_path, CheckpointConfig(), handle_signals=False)
    assert manager2.supersede(1, "b") == (tmp_path / "checkpoints" / "superseded" / "b-2", [2])


def test_a_save_that_meets_a_checkpoint_it_did_not_write_raises_and_changes_nothing(tmp_path):
    """Before, it logged `already exists; not writing it again` and the run reported that step's
    checkpoint as its own."""
    saved_run(tmp_path, [5])
    before = listing(tmp_path / "checkpoints")
    other = CheckpointManager(tmp_path, CheckpointConfig(), handle_signals=False)
    published = []
    other.on_published = lambda step, path: published.append(step)
    with pytest.raises(CheckpointConflictError, match=r"step-5 already exists and this run did not write it"):
        other.save(5, state(50))
    assert listing(tmp_path / "checkpoints") == before and published == []
    again = saved_run(tmp_path / "again", [3])
    assert again.save(3, state(3)) == tmp_path / "again" / "checkpoints" / "step-3"  # its own: kept as it is


def test_on_published_comes_once_an_async_checkpoint_is_complete(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(async_save=True), handle_signals=False)
    published = []
    manager.on_published = lambda step, path: published.append((step, layout.is_complete(path)))
    manager.save(1, state(1))
    assert published == []  # staged, still being written
    manager.wait()
    assert published == [(1, True)]


def test_the_first_sigint_asks_for_a_checkpoint_and_a_stop(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    manager = CheckpointManager(tmp_path, CheckpointConfig(interval=0))
    try:
        manager.maybe_save(3, state(3))
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: a flag
        assert manager.interrupted and manager.save_requested and manager.exit_requested
        assert manager.maybe_save(4, state(4)) and manager.complete_steps() == [4]
        assert manager.last_signal == "SIGINT" and manager.last_checkpoint == 4 and manager.stopping
    finally:
        manager.close()
    assert signal.getsignal(signal.SIGINT) == previous


def test_a_signal_after_the_step_boundary_check_stops_the_run_only_after_its_checkpoint(tmp_path):
    """The loop stops on `stopping`, set once an exit signal's checkpoint is complete: a SIGTERM that
    lands between the manager's check and the loop's (before, the loop read `exit_requested` and
    stopped without a checkpoint, and on several ranks one rank could stop alone) waits a step."""
    manager = CheckpointManager(tmp_path, CheckpointConfig(interval=0))
    try:
        assert not manager.maybe_save(1, state(1))
        os.kill(os.getpid(), signal.SIGTERM)  # after the check of step 1
        assert manager.exit_requested and not manager.stopping
        assert manager.maybe_save(2, state(2)) and manager.stopping
        assert manager.complete_steps() == [2]
    finally:
        manager.close()


def test_deepspeed_parts_of_later_steps_move_with_them(tmp_path):
    """A DeepSpeed run's `deepspeed/step-N` folders (and their universal conversions) of the
    abandoned steps go to `deepspeed/superseded/<branch>/`, so the new branch writes its own."""
    from fitscale.checkpoint.deepspeed import checkpoint_dir, supersede_deepspeed_steps

    folder = checkpoint_dir(tmp_path)
    for name in ("step-2", "step-4", "step-6", "universal/step-2", "universal/step-6"):
        (folder / name).mkdir(parents=True)
        (folder / name / "part.pt").write_text(name)
    moved = supersede_deepspeed_steps(tmp_path, 2, "from-step-2-attempt-2")
    assert moved == [
        folder / "superseded" / "from-step-2-attempt-2",
        folder / "universal" / "superseded" / "from-step-2-attempt-2",
    ]
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-2"]
    assert (moved[0] / "step-6" / "part.pt").read_text() == "step-6"
    assert (moved[1] / "step-6" / "part.pt").read_text() == "universal/step-6"
    assert (folder / "universal" / "step-2").is_dir()
