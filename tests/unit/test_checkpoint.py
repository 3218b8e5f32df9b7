"""CheckpointManager in one process: exact resume, visibility, retention, resume policy, errors, signals."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from fitscale.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    ModelState,
    OptimizerState,
    PerRankState,
    RNGState,
    layout,
)
from fitscale.config.checkpoint import CheckpointConfig
from fitscale.config.optim import EMAConfig, OptimConfig, ScheduleConfig
from fitscale.data.batch import pack_images
from fitscale.models import build_model
from fitscale.parallel.ema import EMA
from fitscale.train.optim import build_optimizer
from fitscale.train.schedule import build_lr_scheduler


class Counter:
    """A Stateful holding a plain int (the kind of value DCP stores as an object)."""

    def __init__(self, value: int = 0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state_dict):
        self.value = state_dict["value"]


class Run:
    """Model, optimizer, schedule and EMA of a tiny FiT, stepped on random packed images."""

    def __init__(self, seed: int = 0, hidden_size: int = 64):
        torch.manual_seed(seed)
        self.model = build_model("tiny", hidden_size=hidden_size, attn_backend="reference")
        self.optimizer = build_optimizer(self.model, OptimConfig(lr=1e-3))
        self.scheduler = build_lr_scheduler(self.optimizer, ScheduleConfig(name="cosine", warmup_steps=2), 20)
        self.ema = EMA(self.model, EMAConfig(decay=0.9))
        self.counter = Counter()

    def step(self, step: int) -> None:
        grids = [(2, 3), (4, 4)]
        batch = pack_images([torch.randn(r * c, 16) for r, c in grids], grids, [1, 2], [0, 1], null_class=10)
        t = torch.rand(2)
        out = self.model(
            batch.tokens, t, batch.labels, batch.pos, batch.cu_seqlens, batch.max_seqlen, batch.sizes
        )
        (out - batch.tokens).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.ema.update(step)
        self.counter.value = step

    def state(self) -> dict:
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "lr_scheduler": self.scheduler,
            "ema": self.ema,
            "progress": self.counter,
            "rng": PerRankState(RNGState()),
        }

    def snapshot(self) -> dict[str, torch.Tensor]:
        tensors = {f"model.{k}": v.clone() for k, v in self.model.state_dict().items()}
        tensors |= {f"ema.{k}": v.clone() for k, v in self.ema.shadow.items()}
        for name, param in self.model.named_parameters():
            for key, value in self.optimizer.state[param].items():
                tensors[f"optim.{name}.{key}"] = value.clone()
        return tensors


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def listing(folder) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def test_resume_is_bit_identical(tmp_path):
    reference = Run()
    initial = reference.model.final_layer.linear.weight.detach().clone()
    manager = CheckpointManager(tmp_path, CheckpointConfig(interval=2), handle_signals=False)
    for step in range(1, 5):
        reference.step(step)
        manager.maybe_save(step, reference.state())
    assert manager.complete_steps() == [2, 4]
    reference.step(5)
    expected = reference.snapshot()
    assert not torch.equal(expected["model.final_layer.linear.weight"], initial)  # training moved the weights

    resumed = Run(seed=123)  # different initial weights and RNG: everything must come from the checkpoint
    assert manager.maybe_resume(resumed.state()) == 4
    assert resumed.counter.value == 4
    assert resumed.scheduler.last_epoch == 4
    resumed.step(5)
    assert_identical(resumed.snapshot(), expected)
    meta = layout.read_metadata(tmp_path / "checkpoints" / "step-4")
    assert meta["world_size"] == 1 and meta["per_rank_keys"] == ["rng"]


def test_only_complete_checkpoints_are_visible(tmp_path):
    run = Run()
    manager = CheckpointManager(tmp_path, CheckpointConfig(interval=0), handle_signals=False)
    manager.save(3, run.state())
    folder = tmp_path / "checkpoints"
    (folder / ".step-9.tmp").mkdir()  # a save that never finished
    (folder / "step-8").mkdir()  # copied by hand without metadata
    (folder / "step-8" / ".metadata").write_bytes(b"")
    assert manager.latest_step() == 3
    assert manager.resume_step("auto") == 3
    with pytest.raises(
        FileNotFoundError, match=r"step-8 is not a complete checkpoint; complete steps in .*: \[3\]"
    ):
        manager.load(8, run.state())


def test_existing_checkpoint_is_never_rewritten(tmp_path):
    run = Run()
    manager = CheckpointManager(tmp_path, CheckpointConfig(), handle_signals=False)
    manager.save(5, run.state())
    before = listing(tmp_path / "checkpoints")
    run.step(6)
    manager.save(5, run.state())
    assert listing(tmp_path / "checkpoints") == before


def test_retention_keeps_last_k_and_every_m(tmp_path):
    run = Run()
    manager = CheckpointManager(
        tmp_path, CheckpointConfig(interval=1, keep_last=2, keep_every=4), handle_signals=False
    )
    for step in range(1, 10):
        manager.maybe_save(step, run.state())
    assert manager.complete_steps() == [4, 8, 9]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4", "step-8", "step-9"]


def test_retention_rule():
    assert layout.steps_to_delete([1, 2, 3, 4, 5], 5, keep_last=2, keep_every=0) == [1, 2, 3]
    assert layout.steps_to_delete([2, 4, 6, 8, 10], 10, keep_last=1, keep_every=4) == [2, 6]
    # later checkpoints of an abandoned branch (resumed from 3) are not older: never deleted
    assert layout.steps_to_delete([1, 2, 3, 4, 7, 8], 4, keep_last=1, keep_every=0) == [1, 2, 3]
    assert layout.steps_to_delete([1, 2, 3], 3, keep_last=0, keep_every=0) == []


def test_resume_policies(tmp_path):
    run = Run()
    manager = CheckpointManager(tmp_path, CheckpointConfig(), handle_signals=False)
    assert manager.resume_step("auto") is None
    assert manager.resume_step("never") is None
    manager.save(2, run.state())
    manager.save(4, run.state())
    assert manager.resume_step("auto") == 4
    assert manager.resume_step("2") == 2
    with pytest.raises(
        FileExistsError, match=r"already holds checkpoints \(steps \[2, 4\]\); with train.resume=never"
    ):
        manager.resume_step("never")
    with pytest.raises(FileNotFoundError, match=r"train.resume=3: .*step-3 is not a complete checkpoint"):
        manager.resume_step("3")


def test_incompatible_checkpoint_names_the_folder_and_changes_nothing(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(), handle_signals=False)
    manager.save(1, Run().state())
    before = listing(tmp_path / "checkpoints")
    wider = Run(hidden_size=128)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"checkpoint .*step-1 \(step 1, 1 ranks\) does not fit this run: .*[Ss]ize mismatch",
    ):
        manager.load(1, wider.state())
    state = Run().state()
    state["extra"] = Counter()
    with pytest.raises(CheckpointMismatchError, match=r"does not fit this run: .*Missing key.*extra"):
        manager.load(1, state)
    assert listing(tmp_path / "checkpoints") == before


def test_leftovers_of_a_crashed_save_are_cleared_on_the_next_save(tmp_path):
    run = Run()
    stale = tmp_path / "checkpoints" / ".step-2.tmp"
    stale.mkdir(parents=True)
    (stale / "__0_0.distcp").write_bytes(b"partial")
    manager = CheckpointManager(tmp_path, CheckpointConfig(), handle_signals=False)
    manager.save(2, run.state())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-2"]


def test_signals_request_a_save_and_sigterm_an_exit(tmp_path):
    run = Run()
    previous = signal.getsignal(signal.SIGUSR1)
    manager = CheckpointManager(tmp_path, CheckpointConfig(interval=0))
    assert not manager.maybe_save(1, run.state())
    os.kill(os.getpid(), signal.SIGUSR1)
    assert manager.save_requested and not manager.exit_requested
    assert manager.maybe_save(2, run.state())
    assert not manager.save_requested and manager.complete_steps() == [2]
    os.kill(os.getpid(), signal.SIGTERM)
    assert manager.maybe_save(3, run.state())
    assert manager.exit_requested and manager.last_signal == "SIGTERM"
    assert manager.complete_steps() == [2, 3]
    manager.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


def test_async_save_writes_the_state_of_the_save_step(tmp_path):
    run = Run()
    run.step(1)
    expected = run.snapshot()
    manager = CheckpointManager(tmp_path, CheckpointConfig(async_save=True), handle_signals=False)
    manager.save(1, run.state())
    run.step(2)  # training goes on while the background thread writes
    manager.wait()
    assert manager.complete_steps() == [1]
    assert layout.read_metadata(tmp_path / "checkpoints" / "step-1")["async"] is True
    restored = Run(seed=7)
    manager.load(1, restored.state())
    assert_identical(restored.snapshot(), expected)
