"""`launch_local` and multi-node launches without SLURM, with real processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.train_runs import WORKER

from fitscale.runtime.local import free_port, launch_local

REPO = Path(__file__).resolve().parents[2]

ALLREDUCE = """
import json, sys
from fitscale.runtime.env import allreduce_check
result = allreduce_check()
open(f"{sys.argv[1]}/rank{result['rank']}.json", "w").write(json.dumps(result))
"""

SIGNALS = """
import os, pathlib, signal, sys, time
out, got = pathlib.Path(sys.argv[1]), []
for name in ("SIGUSR1", "SIGUSR2", "SIGTERM"):
    signal.signal(getattr(signal, name), lambda s, f: got.append(signal.Signals(s).name))
(out / f"ready{os.environ['RANK']}").write_text("")
while "SIGTERM" not in got:
    time.sleep(0.02)
(out / f"rank{os.environ['RANK']}.json").write_text(repr(got))
"""

FAIL_ONE = """
import os, sys, time
if os.environ["RANK"] == "1":
    sys.exit(3)
time.sleep(600)
"""


@pytest.mark.slow
def test_two_nodes_of_two_ranks_rendezvous_on_loopback(tmp_path):
    port = free_port()
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys; from fitscale.runtime.local import launch_local; "
                f"sys.exit(launch_local([sys.executable, '-c', {ALLREDUCE!r}, {str(tmp_path)!r}], 2, "
                f"nnodes=2, node_rank={node}, master_port={port}))",
            ],
        )  # fmt: skip
        for node in (0, 1)
    ]
    assert [node.wait(timeout=300) for node in nodes] == [0, 0]
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]
    assert all(r["sum"] == 10.0 and r["world_size"] == 4 for r in results)  # 1 + 2 + 3 + 4
    assert [(r["node_rank"], r["local_rank"]) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_signals_reach_every_rank_and_the_launcher_waits_for_them(tmp_path):
    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from fitscale.runtime.local import launch_local; "
         f"sys.exit(launch_local([sys.executable, '-c', {SIGNALS!r}, {str(tmp_path)!r}], 2))"],
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{rank}").exists() for rank in (0, 1)):
        assert time.monotonic() < deadline and launcher.poll() is None, "ranks did not start"
        time.sleep(0.05)
    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        launcher.send_signal(signum)
        time.sleep(0.3)
    assert launcher.wait(timeout=60) == 0
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.json").read_text() == "['SIGUSR1', 'SIGUSR2', 'SIGTERM']"


def test_a_failing_rank_stops_the_others_and_its_code_is_returned(capfd):
    started = time.monotonic()
    code = launch_local([sys.executable, "-c", FAIL_ONE], 2, stop_grace_s=5)
    assert code == 3
    assert time.monotonic() - started < 120, "the sleeping rank was not stopped"
    assert "rank 1 exited with code 3; stopping the other ranks" in capfd.readouterr().err


def test_multi_node_launch_needs_an_agreed_port():
    with pytest.raises(ValueError, match="explicit master_port"):
        launch_local([sys.executable, "-c", "pass"], 1, nnodes=2, node_rank=0)
    with pytest.raises(ValueError, match=r"node_rank must be in \[0, nnodes=2\), got 2"):
        launch_local([sys.executable, "-c", "pass"], 1, nnodes=2, node_rank=2, master_port=1)


# ---------------------------------------------------------------------------------- HSDP training
# The trainer's own test worker: the real Trainer on seeded in-memory data. (MosaicML Streaming
# shares memory between the ranks of one host, so two "nodes" on one host cannot both open it.)
TRAIN = ["train.steps=3", "checkpoint.interval=0", "parallel.sharding=hybrid", "log.wandb=disabled"]


def start_node(run_dir: Path, nproc: int, nnodes: int, node_rank: int, port: int, *overrides: str):
    worker = [sys.executable, str(WORKER), str(run_dir), "--global-batch", "8", "--set", *TRAIN, *overrides]
    code = (
        "import sys; from fitscale.runtime.local import launch_local; "
        f"sys.exit(launch_local({worker!r}, {nproc}, nnodes={nnodes}, node_rank={node_rank}, master_port={port}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)


def final_model(run_dir: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    (step_dir,) = sorted((run_dir / "checkpoints").glob("step-*"))
    out = tmp_path / f"{run_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=False)["model"]


@pytest.mark.slow
def test_hsdp_over_two_loopback_nodes_matches_one_node_with_the_same_mesh(tmp_path):
    """2 nodes x 2 ranks (replicated across nodes, sharded within) = 1 node x 4 ranks in shard groups of 2."""
    port = free_port()
    two_nodes = tmp_path / "two-nodes"
    nodes = [start_node(two_nodes, 2, 2, node, port) for node in (0, 1)]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    one_node = tmp_path / "one-node"
    single = start_node(one_node, 4, 1, 0, free_port(), "parallel.shard_size=2")
    error = single.communicate(timeout=600)[1]
    assert single.returncode == 0, error[-3000:]
    got, want = final_model(two_nodes, tmp_path), final_model(one_node, tmp_path)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[name], want[name]) for name in want)


def test_multi_node_local_launch_without_a_port_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "launch", "recipes/demo.yaml", "--cluster", "local", "--nnodes", "2",
         "--set", f"train.run_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "fitscale launch: error: a multi-node launch needs an explicit master_port that every node agrees on"
    )
