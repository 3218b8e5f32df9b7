"""Errors of multi-process runs: one line and the single-process run's exit status, found before any
rank starts when no process group is needed, else reported once from the first failing rank."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.train_runs import write_digits_split

from fitscale.cli import main
from fitscale.report.status import run_status
from fitscale.runtime.failures import ERROR_DIR_ENV, launch_failure, record_failure

REPO = Path(__file__).resolve().parents[2]


def train_args(run_dir: Path, data: Path, *extra: str, nproc: int = 2) -> list[str]:
    sets = [f"train.run_dir={run_dir}", f"data.path={data}", "hooks.before=[]", "hooks.after=[]", *extra]
    return ["train", "recipes/demo.yaml", "--nproc", str(nproc), "--set", *sets]


def test_errors_that_need_no_process_group_stop_the_launch_before_any_rank_starts(
    tmp_path, capsys, monkeypatch
):
    data = write_digits_split(tmp_path / "digits", images=4)
    missing = tmp_path / "no-data"
    cases = [
        (train_args(tmp_path / "a", missing),
         f"data.path={missing} holds no dataset (no fitscale.json); write one with `fitscale data ...` or "
         "point data.path at a dataset folder"),
        (train_args(tmp_path / "b", data, nproc=3),
         "data.global_batch_size=32 does not divide over 3 ranks (3 process(es)); set it to a multiple of 3"),
    ]  # fmt: skip
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "deepspeed" else real_find_spec(name, *a),
    )
    cases.append(
        (train_args(tmp_path / "c", data, "parallel.backend=deepspeed", "optim.ema.enabled=false"),
         "parallel.backend=deepspeed needs DeepSpeed: pip install 'fitscale[deepspeed]' "
         f"(it is not installed in {sys.executable})")
    )  # fmt: skip
    for args, message in cases:
        assert main(args) == 2
        assert capsys.readouterr().err.splitlines() == [f"fitscale train: error: {message}"]
        run_dir = Path(args[args.index("--set") + 1].split("=", 1)[1])
        assert not (run_dir / "logs").exists(), "no rank may have started"


@pytest.mark.slow
def test_an_error_inside_the_ranks_is_reported_once_in_one_line_with_its_exit_status(tmp_path):
    data = write_digits_split(tmp_path / "digits", images=4)
    run_dir, missing = tmp_path / "run", tmp_path / "none.safetensors"
    args = train_args(run_dir, data, "parallel.backend=deepspeed", "optim.ema.enabled=false",
                      f"train.init_from={missing}")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "fitscale.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    # Both ranks fail (rank 0 reads the file for all); the user sees the first one, once.
    assert result.stderr.splitlines() == [
        f"fitscale train: error: rank 0: checkpoint file {missing} does not exist"
    ], result.stderr
    assert result.returncode == 2  # as one process exits on a bad setting
    assert (run_dir / "logs" / "rank-1.log").is_file()  # rank 1's own output, off the terminal
    status = run_status(run_dir)
    assert status["last_error"] == f"rank 0: checkpoint file {missing} does not exist"  # the same line


def clock(monkeypatch) -> None:
    """Reports written one second apart, so which came first never rests on the clock's resolution."""
    from types import SimpleNamespace

    from fitscale.runtime import failures

    ticks = iter(range(1000, 2000))
    monkeypatch.setattr(failures, "time", SimpleNamespace(time=lambda: float(next(ticks))))


def test_the_launcher_reports_the_first_failure_with_the_single_process_exit_status(tmp_path, monkeypatch):
    clock(monkeypatch)
    monkeypatch.setenv(ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    record_failure(RuntimeError("all_reduce failed\nsecond line"), user_error=False)
    monkeypatch.setenv("RANK", "0")
    record_failure(ValueError("lost its peer"), user_error=True)  # written later: a consequence
    failure = launch_failure(tmp_path, code=2)
    assert (str(failure), failure.code) == ("RuntimeError: all_reduce failed", 1)
    assert (
        "RuntimeError: all_reduce failed\nsecond line" in failure.details
    )  # the traceback, for FITSCALE_DEBUG
    empty = tmp_path / "none"
    empty.mkdir()
    killed = launch_failure(empty, code=-9)
    assert (str(killed), killed.code) == ("a rank was killed by signal 9; see its log in the run folder", 137)


def test_a_slurm_job_reports_its_first_failing_rank(tmp_path, monkeypatch):
    import pickle

    from fitscale.launch.slurm import failure_reason
    from fitscale.runtime.failures import slurm_error_folder

    clock(monkeypatch)
    # submitit's pickle of task 0 holds the consequence (its peer was gone), not the cause.
    (tmp_path / "77_0_result.pkl").write_bytes(
        pickle.dumps(("error", "Traceback ...\nRuntimeError: peer lost"))
    )
    assert failure_reason(tmp_path, "77") == "task 0: RuntimeError: peer lost"
    for restart, rank, error in (
        (0, 0, ValueError("stale attempt")),
        (1, 1, ValueError("data.path=/x: no dataset")),
    ):
        monkeypatch.setenv("RANK", str(rank))
        record_failure(error, user_error=True, folder=slurm_error_folder(tmp_path, "77", restart))
    monkeypatch.setenv("RANK", "0")
    record_failure(RuntimeError("peer lost"), user_error=False, folder=slurm_error_folder(tmp_path, "77", 1))
    assert failure_reason(tmp_path, "77") == "data.path=/x: no dataset"
