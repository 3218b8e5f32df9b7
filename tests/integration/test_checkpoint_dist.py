"""CheckpointManager across real processes: FSDP2 resharding 2 -> 1 and 4 ranks, per-rank state,
asynchronous saves, signals that reach one rank, and a process killed while writing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fitscale.checkpoint import (
    CheckpointManager,
    CheckpointMismatchError,
    ModelState,
    OptimizerState,
    PerRankState,
    RNGState,
)
from fitscale.checkpoint.export import export_checkpoint
from fitscale.config.checkpoint import CheckpointConfig
from fitscale.config.optim import EMAConfig, OptimConfig, ScheduleConfig
from fitscale.runtime.env import leave_process_group

pytestmark = pytest.mark.slow


def spawn(fn, world_size: int, tmp_path: Path, *args) -> None:
    store = tmp_path / f"store-{uuid.uuid4().hex}"
    mp.start_processes(
        _entry, args=(fn, world_size, str(store), args), nprocs=world_size, start_method="spawn"
    )


def _entry(rank: int, fn, world_size: int, store: str, args) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        leave_process_group()


class Tag:
    """Per-rank plain value (like a data-loader position)."""

    def __init__(self, value: int):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state_dict):
        self.value = state_dict["value"]


class Training:
    """A tiny FiT sharded with FSDP2 over all ranks, with AdamW, schedule and EMA."""

    def __init__(self, world_size: int):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from fitscale.models import build_model
        from fitscale.parallel.ema import EMA
        from fitscale.train.optim import build_optimizer
        from fitscale.train.schedule import build_lr_scheduler

        mesh = init_device_mesh("cpu", (world_size,))
        torch.manual_seed(0)
        self.model = build_model("tiny", attn_backend="reference")
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self.optimizer = build_optimizer(self.model, OptimConfig(lr=1e-3))
        self.scheduler = build_lr_scheduler(self.optimizer, ScheduleConfig(warmup_steps=2), 10)
        self.ema = EMA(self.model, EMAConfig(decay=0.5))

    def step(self, step: int) -> None:
        from fitscale.data.batch import pack_images

        grids = [(2, 2), (3, 2)]
        batch = pack_images([torch.randn(r * c, 16) for r, c in grids], grids, [1, 3], [0, 1], null_class=10)
        out = self.model(
            batch.tokens, torch.rand(2), batch.labels, batch.pos, batch.cu_seqlens, batch.max_seqlen
        )
        (out - batch.tokens).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.ema.update(step)

    def state(self, **extra) -> dict:
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "lr_scheduler": self.scheduler,
            "ema": self.ema,
            "rng": PerRankState(RNGState()),
            **extra,
        }

    def full_state(self) -> dict[str, torch.Tensor]:
        """Everything gathered to full tensors (collective)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
        full = {f"model.{k}": v for k, v in get_model_state_dict(self.model, options=options).items()}
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        full |= {f"optim.{k}": v for k, v in optim.items() if isinstance(v, torch.Tensor)}
        full |= {f"ema.{k}": v.full_tensor() for k, v in self.ema.shadow.items()}
        return full


def _save_on_two_ranks(rank: int, world_size: int, run_dir: str) -> None:
    from torch.distributed.tensor import DTensor

    training = Training(world_size)
    for name, param in training.model.named_parameters():  # the EMA is sharded exactly like the weights
        shadow = training.ema.shadow[name]
        assert isinstance(shadow, DTensor) and shadow.dtype == torch.float32
        assert shadow.placements == param.placements and shadow.to_local().shape == param.to_local().shape
    torch.manual_seed(100 + rank)  # every rank draws different noise
    for step in (1, 2):
        training.step(step)
    manager = CheckpointManager(run_dir, CheckpointConfig(interval=2), handle_signals=False)
    assert manager.maybe_save(2, training.state(tag=PerRankState(Tag(10 * rank + 7))))
    draws = torch.rand(3)
    torch.save(draws, f"{run_dir}/draws-{rank}.pt")
    reference = training.full_state()
    if rank == 0:
        torch.save(reference, f"{run_dir}/reference.pt")

    # Same world size: every rank gets its own per-rank values back, not rank 0's.
    torch.manual_seed(999)
    tag = Tag(-1)
    with torch.no_grad():
        for param in training.model.parameters():
            param.zero_()
    assert manager.load(2, training.state(tag=PerRankState(tag))) == 2
    assert tag.value == 10 * rank + 7
    assert torch.equal(torch.rand(3), draws)
    for key, value in training.full_state().items():
        assert torch.equal(value, reference[key]), key
    manager.close()


def _load_on_other_world_size(rank: int, world_size: int, run_dir: str) -> None:
    training = Training(world_size)
    manager = CheckpointManager(run_dir, CheckpointConfig(interval=2), handle_signals=False)
    if world_size == 1:
        with pytest.raises(
            CheckpointMismatchError, match=r"written by 2 ranks and this run has 1; per-rank state 'tag'"
        ):
            manager.load(2, training.state(tag=PerRankState(Tag(0))))
    tag = Tag(-1)
    rule = lambda saved, rank, world_size: tag.load_state_dict(saved[rank % len(saved)])
    assert manager.maybe_resume(training.state(tag=PerRankState(tag, reshard=rule))) == 2
    assert tag.value == 10 * (rank % 2) + 7
    reference = torch.load(f"{run_dir}/reference.pt")
    full = training.full_state()
    assert full.keys() == reference.keys()
    for key, value in full.items():
        assert torch.equal(value, reference[key]), key
    draw = torch.rand(3)
    if rank < 2:  # ranks that existed keep their noise stream
        assert torch.equal(draw, torch.load(f"{run_dir}/draws-{rank}.pt"))
    gathered = [torch.zeros(3) for _ in range(world_size)]
    dist.all_gather(gathered, draw)
    assert len({tuple(g.tolist()) for g in gathered}) == world_size  # new ranks get distinct streams
    training.step(3)  # and training continues
    manager.close()


def _two_rank_checks(rank: int, world_size: int, run_dir: str, async_run_dir: str) -> None:
    _save_on_two_ranks(rank, world_size, run_dir)
    _async_and_signals(rank, world_size, async_run_dir)  # shares the processes: they are slow to start


def test_fsdp_checkpoint_reshards_async_saves_and_signals_on_one_rank(tmp_path):
    """2 ranks save (per-rank values kept), then 1 and 4 ranks load and train on; an async save with
    signals that reach one rank; the offline export of the 2-rank checkpoint."""
    run_dir = str(tmp_path / "run")
    spawn(_two_rank_checks, 2, tmp_path, run_dir, str(tmp_path / "async_run"))
    for world_size in (1, 4):
        spawn(_load_on_other_world_size, world_size, tmp_path, run_dir)

    # Offline export (one process, no process group) assembles the shards both ranks wrote.
    reference = torch.load(f"{run_dir}/reference.pt")
    for ema in (False, True):
        out = tmp_path / f"export-{ema}.safetensors"
        export_checkpoint(run_dir, out, ema=ema)
        prefix = "ema." if ema else "model."
        expected = {k[len(prefix) :]: v for k, v in reference.items() if k.startswith(prefix)}
        exported = load_file(str(out))
        assert exported.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(exported[key], value), key


def _async_and_signals(rank: int, world_size: int, run_dir: str) -> None:
    training = Training(world_size)
    manager = CheckpointManager(run_dir, CheckpointConfig(interval=0, async_save=True))
    torch.manual_seed(rank)
    training.step(1)
    if rank == 0:  # the signal reaches one rank only; both must save at the same step
        os.kill(os.getpid(), signal.SIGUSR1)
    assert manager.maybe_save(1, training.state())
    expected = training.full_state()
    training.step(2)  # runs while step 1 is written in the background
    assert not manager.maybe_save(2, training.state())
    manager.wait()
    assert manager.complete_steps() == [1]
    manager.load(1, training.state())
    for key, value in training.full_state().items():
        assert torch.equal(value, expected[key]), key
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    assert manager.maybe_save(3, training.state())
    assert manager.exit_requested  # on both ranks, though only rank 1 was signalled
    assert manager.complete_steps() == [1, 3]  # an exit save is published before maybe_save returns
    manager.close()


KILLED_WRITER = textwrap.dedent(
    """
    import sys, torch
    from fitscale.checkpoint import CheckpointManager
    from fitscale.config.checkpoint import CheckpointConfig

    class Weights:
        def __init__(self, tensors):
            self.tensors = tensors
        def state_dict(self):
            return self.tensors
        def load_state_dict(self, state_dict):
            self.tensors = state_dict

    manager = CheckpointManager(sys.argv[1], CheckpointConfig(keep_last=1), handle_signals=False)
    manager.save(1, {"weights": Weights({"w": torch.arange(10.0)})})
    big = {f"w{i}": torch.full((4_000_000,), float(i)) for i in range(32)}  # 512 MB
    print("writing", flush=True)
    manager.save(2, {"weights": Weights(big)})
    print("finished", flush=True)
    """
)


def test_process_killed_while_writing_leaves_the_previous_checkpoint_loadable(tmp_path):
    run_dir = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "writing"
    partial = run_dir / "checkpoints" / ".step-2.tmp"
    deadline = time.monotonic() + 60
    while not any(partial.glob("*.distcp")) and time.monotonic() < deadline:
        time.sleep(0.001)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL

    manager = CheckpointManager(run_dir, CheckpointConfig(keep_last=1), handle_signals=False)
    assert partial.is_dir() and not (run_dir / "checkpoints" / "step-2").exists()
    assert manager.latest_step() == 1 and manager.resume_step("auto") == 1

    class Weights:
        tensors = {"w": torch.zeros(10)}

        def state_dict(self):
            return self.tensors

        def load_state_dict(self, state_dict):
            self.tensors = state_dict

    weights = Weights()
    assert manager.maybe_resume({"weights": weights}) == 1
    assert torch.equal(weights.tensors["w"], torch.arange(10.0))
    manager.save(2, {"weights": weights})  # the next save clears the leftover and retention the old step
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
