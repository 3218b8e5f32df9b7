"""A rank that dies without a report (killed by a signal, or exiting without one) is the cause the
launcher names, ahead of the connection errors its peers then report; real ranks on gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.train_runs import write_digits_split

from fitscale.runtime.failures import WorkerFailed, run_ranks

REPO = Path(__file__).resolve().parents[2]

# Two gloo ranks all-reducing in a loop; rank 1 stops after 20 rounds as argv[1] says, and rank 0
# reports the connection error it then meets, as fitscale's CLI does in a launched rank.
PEERS = r"""
import os, signal, sys, torch, torch.distributed as dist
from fitscale.runtime.failures import record_failure
dist.init_process_group("gloo")
rank = dist.get_rank()
try:
    for round in range(100000):
        if rank == 1 and round == 20:
            if sys.argv[1] == "exit":
                os._exit(3)
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        dist.all_reduce(torch.ones(1000))
except Exception as error:
    record_failure(error, user_error=False)
    os._exit(1)
"""


def run_peers(tmp_path: Path, how: str) -> tuple[WorkerFailed, dict]:
    with pytest.raises(WorkerFailed) as caught:
        run_ranks(
            [sys.executable, "-c", PEERS, how], 2, tmp_path, env={"OMP_NUM_THREADS": "1"}, stop_grace_s=10
        )
    return caught.value, json.loads((tmp_path / "logs" / "last-error.json").read_text())


@pytest.mark.parametrize(
    "how, message, code",
    [
        ("SIGSEGV", "rank 1 was killed by SIGSEGV (signal 11) (a crash in native code", 139),
        ("SIGTERM", "rank 1 was killed by SIGTERM (signal 15) (stopped from outside fitscale", 143),
        ("exit", "rank 1 exited with status 3 without an error report", 3),
    ],
)
def test_the_rank_that_died_first_is_named_not_its_peers_connection_error(tmp_path, how, message, code):
    failure, report = run_peers(tmp_path, how)
    assert str(failure).startswith(message), str(failure)
    assert str(failure).endswith(f"its output is in {tmp_path / 'logs' / 'rank-1.log'}")
    assert failure.code == code
    assert report["message"] == str(failure)  # logs/last-error.json, for `fitscale status`


def rank_pid(run_dir: Path, rank: int) -> int | None:
    """The process id of rank `rank` of the `fitscale train` run writing `run_dir` (from /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ and f"train.run_dir={run_dir}".encode() in cmdline:
            return int(entry.name)
    return None


@pytest.mark.slow
def test_a_training_rank_killed_by_sigkill_is_named_with_the_signal(tmp_path):
    data = write_digits_split(tmp_path / "digits", images=64)
    run_dir = tmp_path / "run"
    sets = [f"train.run_dir={run_dir}", f"data.path={data}", "hooks.before=[]", "hooks.after=[]",
            "train.steps=100000", "checkpoint.interval=0", "log.every=1"]  # fmt: skip
    launcher = subprocess.Popen(
        [sys.executable, "-m", "fitscale.cli", "train", "recipes/demo.yaml", "--nproc", "2", "--set", *sets],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count('"loss"') >= 3):
            assert time.monotonic() < deadline and launcher.poll() is None, "the run did not start training"
            time.sleep(0.2)
        os.kill(rank_pid(run_dir, 1), signal.SIGKILL)  # as the kernel's out-of-memory killer would
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    expected = (
        "fitscale train: error: rank 1 was killed by SIGKILL (signal 9) (out of memory? the kernel's OOM killer "
        f"sends SIGKILL: check `dmesg` (or `journalctl -k`)); its output is in {run_dir / 'logs' / 'rank-1.log'}"
    )
    assert err.splitlines()[-1] == expected, err
    assert "Connection" not in err
    assert launcher.returncode == 137
    report = json.loads((run_dir / "logs" / "last-error.json").read_text())
    assert report["rank"] == 1 and "fitscale train: error: " + report["message"] == expected
