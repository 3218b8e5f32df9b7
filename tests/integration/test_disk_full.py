"""A full disk on a real small filesystem (a 16 MiB tmpfs): checkpoints on 1 and 2 ranks, the
metrics log, a dataset write, and a killed run's unfinished checkpoint found at the next start.

Each failure is one line naming the path, the space and the fix; nothing complete is touched, the
unfinished folder is removed, and once there is room again a rerun continues.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.train_runs import write_digits_split

from fitscale.cli import main

REPO = Path(__file__).resolve().parents[2]
DCP_WARNING = "torch.distributed is disabled"


@pytest.fixture
def small_fs(tmp_path):
    """A fresh 16 MiB tmpfs; `small_fs.grow(size)` makes room later, as freeing space would."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")

    class SmallFs:
        path = folder

        @staticmethod
        def grow(size: str) -> None:
            subprocess.run(["mount", "-o", f"remount,size={size}", str(folder)], check=True)

        @staticmethod
        def fill(leave: int) -> None:
            """A file that leaves `leave` bytes free."""
            free = shutil.disk_usage(folder).free
            with open(folder / "filler", "wb") as handle:
                handle.write(b"\0" * (free - leave))

    yield SmallFs
    subprocess.run(["umount", "--lazy", str(folder)], check=True)  # lazy: a failed run may hold a file


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits_split(tmp_path_factory.mktemp("data") / "digits", images=64)


def train_args(run_dir: Path, data: Path, *extra: str, nproc: int = 1) -> list[str]:
    sets = [
        f"train.run_dir={run_dir}", f"data.path={data}", "hooks.before=[]", "hooks.after=[]",
        "train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=1", "log.every=1", *extra,
    ]  # fmt: skip
    return ["train", "recipes/demo.yaml", "--nproc", str(nproc), "--set", *sets]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]


def starts(run_dir: Path) -> list[int]:
    """The step each run of this folder started at (the `start` events of metrics.jsonl)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if r.get("event") == "start"]


def test_a_checkpoint_that_does_not_fit_is_one_line_and_a_rerun_resumes(
    small_fs, digits, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    run_dir = small_fs.path / "run"
    assert main(train_args(run_dir, digits)) == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(
        f"fitscale train: error: no space left on the filesystem of {run_dir / 'checkpoints'} for checkpoint "
        "step 4 (it needs about "
    ), lines
    assert (
        "free); its unfinished folder .step-4.tmp was removed and the complete checkpoints are untouched"
        in lines[0]
    )
    assert "lower checkpoint.keep_last (now 1" in lines[0] and "train.run_dir / checkpoint.folder" in lines[0]
    assert DCP_WARNING not in err  # a lone process saves without DCP's warning
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-2"]  # the unfinished save is gone
    small_fs.grow("64m")  # room again
    assert main(train_args(run_dir, digits)) == 0
    assert starts(run_dir) == [0, 2]  # the rerun resumed from the newest complete checkpoint
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-6"]


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_on_two_ranks_is_reported_by_the_launcher(small_fs, digits):
    run_dir = small_fs.path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fitscale.cli", *train_args(run_dir, digits, nproc=2)],
        cwd=REPO, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    prefix = (
        f"fitscale train: error: no space left on the filesystem of {run_dir / 'checkpoints'} for checkpoint "
        "step 4 (it needs about "
    )
    assert lines[0].startswith(prefix), lines
    assert result.returncode == 2
    report = json.loads((run_dir / "logs" / "last-error.json").read_text())
    assert "fitscale train: error: " + report["message"] == lines[0]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-2"]


def test_a_full_disk_at_a_metrics_write_names_the_metrics_log(small_fs, digits, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    run_dir = small_fs.path / "run"
    small_fs.fill(leave=16 * 1024)  # the lock, the config and a few metrics records
    args = train_args(
        run_dir, digits, "train.steps=200", "checkpoint.interval=0", "checkpoint.save_at_end=false"
    )
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(
        f"fitscale train: error: no space left on the filesystem of {run_dir / 'metrics.jsonl'} for the metrics log ("
    ), lines
    assert lines[0].endswith("free); free space there, or point train.run_dir at a larger filesystem"), lines


def test_a_killed_runs_unfinished_checkpoint_is_removed_before_the_first_write(
    small_fs, digits, capsys, monkeypatch
):
    monkeypatch.chdir(REPO)
    run_dir = small_fs.path / "run"
    leftover = run_dir / "checkpoints" / ".step-6.tmp"
    leftover.mkdir(parents=True)
    complete = run_dir / "checkpoints" / "step-0-notes"  # not ours: never touched
    complete.mkdir()
    free = shutil.disk_usage(small_fs.path).free
    (leftover / "__0_0.distcp").write_bytes(b"\0" * (free - 8 * 1024))  # what a killed save left: a full disk
    assert main(train_args(run_dir, digits, "train.steps=2")) == 0, capsys.readouterr().err
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["step-0-notes", "step-2"]
    assert starts(run_dir) == [0]


def test_a_dataset_write_on_a_full_disk_is_one_line_and_resumes(small_fs, capsys):
    out = small_fs.path / "digits"
    small_fs.fill(leave=3 * 1024 * 1024)
    args = ["data", "digits", str(out), "--variants", "1", "--part-size", "300", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()], err
    assert err.startswith(
        f"fitscale data: error: no space left on the filesystem of {out} for the dataset ("
    ), err
    assert "free space there or write the dataset to another folder; rerun the same command to resume" in err
    parts = sorted(os.listdir(out / "parts"))
    assert parts and not [p for p in parts if p.endswith(".tmp")], parts  # complete parts kept, no half one
    (small_fs.path / "filler").unlink()
    assert main(args) == 0
    assert json.loads((out / "fitscale.json").read_text())["num_samples"] == 1797


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A tiny model's weights as a safetensors file (689 KiB)."""
    import torch
    from safetensors.torch import save_file

    from fitscale.models import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(build_model("tiny", attn_backend="reference").state_dict(), str(path))
    return path


def test_sample_output_on_a_full_disk_is_one_line_naming_out(small_fs, tiny_weights, capsys):
    """Was `no space left on device ([Errno 28] ...); free space on the filesystem this command writes
    to`, naming no path (numpy's write error carries none)."""
    out = small_fs.path / "samples"
    small_fs.fill(leave=16 * 1024)
    options = "--model tiny --set attn_backend=reference --height 64 --width 64 --num-per-size 40 --steps 1"
    argv = ["sample", str(tiny_weights), "--out", str(out), *options.split(), "--preview-channel", "0"]
    assert main([*argv, "--sampler", "euler", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()], err
    assert err.startswith(
        f"fitscale sample: error: no space left on the filesystem of {out} for the samples ("
    ), err
    assert err.strip().endswith("free space there or pass another --out; a rerun writes every image again"), (
        err
    )


def test_a_weights_file_on_a_full_disk_is_one_line_and_leaves_no_partial_file(small_fs, tiny_weights, capsys):
    """Was a traceback ending in safetensors' `SafetensorError: Error while serializing: I/O error: No
    space left on device (os error 28)` (a Rust error: the errno only in its message)."""
    out = small_fs.path / "tiny-copy.safetensors"
    small_fs.fill(leave=256 * 1024)
    assert main(["convert", "official-to-fitscale", str(tiny_weights), str(out), "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()], err
    assert err.startswith(
        f"fitscale convert: error: no space left on the filesystem of {out} for the weights file (it needs about "
    ), err
    assert "free space there or write the file to another filesystem" in err
    assert sorted(os.listdir(small_fs.path)) == ["filler"]


def test_a_config_that_does_not_fit_leaves_the_runs_config_yaml_whole(small_fs, digits, capsys, monkeypatch):
    """config.yaml is written through a temporary file and a rename. Before, it was truncated and
    then written: a full disk left it cut short (the config the resume check falls back to, and
    the one `fitscale status` reads its target from)."""
    monkeypatch.chdir(REPO)
    run_dir = small_fs.path / "run"
    quick = ["train.steps=2", "checkpoint.interval=0", "checkpoint.save_at_end=false"]
    assert main(train_args(run_dir, digits, *quick)) == 0, capsys.readouterr().err
    before = (run_dir / "config.yaml").read_text()
    small_fs.fill(leave=0)  # the files' own pages are all that is left
    long_comment = "launch.sbatch.comment=" + "x" * 20000  # a config 5 pages longer
    assert main(train_args(run_dir, digits, *quick, long_comment)) == 2
    err = capsys.readouterr().err
    assert error_lines(err) == [
        f"fitscale train: error: no space left on the filesystem of {run_dir / 'config.yaml'} for the run's config "
        "(0 B free); free space there, or point train.run_dir at a larger filesystem"
    ], err
    assert (run_dir / "config.yaml").read_text() == before
    assert sorted(p for p in os.listdir(run_dir) if "config" in p) == ["config.yaml"]
