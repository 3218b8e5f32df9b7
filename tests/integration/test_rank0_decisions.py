"""File reads that gate a collective give the same outcome on every rank, and never a hang.

Two gloo ranks; a read is made to fail on one rank only (as a shared file system that has not
caught up would), by patching the read on that rank. The run must either go on with rank 0's
answer on both ranks or stop with the same error on both, well within the process group's
timeout (30 s here: a hang would surface as a gloo timeout, not as these outcomes).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow

STALE = "[Errno 116] Stale file handle"


def _outcome(fn) -> str:
    try:
        return f"ok: {fn()}"
    except Exception as error:
        return f"{type(error).__name__}: {error}"


def _ranks(rank: int, world_size: int, store: str, run_dir: str, out: str) -> None:
    from fitscale.checkpoint import CheckpointManager, deepspeed, layout
    from fitscale.config.checkpoint import CheckpointConfig
    from fitscale.runtime.agree import all_ranks_agree, rank0_decides, same_on_all_ranks

    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world_size, timeout=timedelta(seconds=30)
    )
    results: dict[str, str] = {}

    def stale(*_args, **_kwargs):
        raise OSError(STALE)

    def failing_on(where: int, read):
        return stale if rank == where else read

    try:
        manager = CheckpointManager(run_dir, CheckpointConfig(), handle_signals=False)
        state = {"weights": {"w": torch.full((4,), 3.0)}}
        manager.save(5, state)
        real_read, real_steps = layout.read_metadata, layout.complete_steps

        # The checkpoint's fitscale.json and the "latest" discovery unreadable on rank 1 only:
        # rank 0's answer is everyone's, and both ranks load step 5.
        layout.read_metadata, layout.complete_steps = failing_on(1, real_read), failing_on(1, real_steps)
        loaded = {"weights": {"w": torch.zeros(4)}}
        results["rank1_stale"] = _outcome(lambda: (manager.load(manager.resume_step("auto"), loaded), loaded))
        # Unreadable on rank 0 only: the same error on both ranks (rank 1 used to enter DCP's load
        # and wait there for a rank 0 that had already failed).
        layout.read_metadata, layout.complete_steps = failing_on(0, real_read), real_steps
        results["rank0_stale"] = _outcome(lambda: manager.load(5, {"weights": {"w": torch.zeros(4)}}))
        layout.read_metadata = real_read

        # The DeepSpeed resumable check, failing on one rank only.
        class Engine:
            world_size = 2

            def zero_optimization_stage(self):
                return 2

            def load_checkpoint(self, folder, tag):
                return f"{folder}/{tag}", None

        real_check = deepspeed.check_resumable
        deepspeed.check_resumable = failing_on(1, lambda *args: (Path("step-5"), 2))
        results["deepspeed_rank1_stale"] = _outcome(
            lambda: deepspeed.load_deepspeed_state(Engine(), run_dir, 5)
        )
        deepspeed.check_resumable = failing_on(0, real_check)
        results["deepspeed_rank0_stale"] = _outcome(
            lambda: deepspeed.load_deepspeed_state(Engine(), run_dir, 5)
        )
        deepspeed.check_resumable = real_check

        # Reads every rank must make itself (a dataset's files): a failure on one rank stops all.
        results["all_ranks_rank1_fails"] = _outcome(lambda: all_ranks_agree(failing_on(1, lambda: "read")))
        results["same_values"] = _outcome(
            lambda: same_on_all_ranks({"samples": 10 + rank}, "datasets at data.path=d")
        )
        results["rank0_decides"] = _outcome(lambda: rank0_decides(lambda: f"rank {dist.get_rank()} decided"))
        dist.barrier()  # still in step after all of the above
        results["after"] = "in step"
    finally:
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
        from fitscale.runtime.env import leave_process_group

        leave_process_group()


def test_a_read_failing_on_one_rank_gives_one_outcome_on_every_rank(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    context = mp.start_processes(
        _ranks,
        args=(2, str(tmp_path / f"store-{uuid.uuid4().hex}"), str(tmp_path / "run"), str(out)),
        nprocs=2,
        start_method="spawn",
        join=False,
    )
    deadline = time.monotonic() + 240  # each collective gives up after 30 s: a finished run is bounded
    while not context.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks did not finish: a collective is waiting for a rank that never comes")
    rank0, rank1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert rank0 == rank1, (rank0, rank1)
    assert rank0["rank1_stale"].startswith("ok: (5, {'weights': {'w': tensor([3., 3., 3., 3.])}})")
    assert rank0["rank0_stale"] == f"OSError: {STALE}"
    assert rank0["deepspeed_rank1_stale"] == "ok: None"
    assert rank0["deepspeed_rank0_stale"] == f"OSError: {STALE}"
    assert rank0["all_ranks_rank1_fails"] == f"OSError: rank 1: {STALE}"
    assert rank0["same_values"] == (
        "UserError: ranks see different datasets at data.path=d: rank 0 {'samples': 10}, rank 1 "
        "{'samples': 11} (a shared file system that has not caught up, or a file rewritten during "
        "start-up); make the files identical for every node and restart"
    )
    assert rank0["rank0_decides"] == "ok: rank 0 decided"
    assert rank0["after"] == "in step"
