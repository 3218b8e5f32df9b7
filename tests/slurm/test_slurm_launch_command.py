"""`fitscale launch --command -- data from-images ...`: the encoding submitted as a SLURM job of two
tasks through the launcher (cluster profile, sbatch script, submitit) writes, byte for byte, the
dataset one process writes; `--wait` reports each task's end, and a command that fails as the
failing tasks' error lines with exit status 1."""

from __future__ import annotations

import json

import pytest
from helpers.images import autoencoder, files_of, random_image_folder
from slurm_runs import REPO, fitscale_launch

from fitscale.cli import main

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_launched_command_over_two_tasks_writes_the_dataset_one_process_writes(slurm_cluster, tmp_path):
    images = random_image_folder(tmp_path / "images", per_class=5)
    autoencoder("sd").save_pretrained(tmp_path / "vae")
    options = ["--vae", str(tmp_path / "vae"), "--resolution", "64", "--num-classes", "2", "--part-size", "2"]
    options += ["--workers", "0", "--device", "cpu"]
    assert main(["data", "from-images", str(images), str(tmp_path / "one"), *options, "--no-progress"]) == 0
    job = fitscale_launch(
        "--cluster", str(REPO / "cluster" / "local-slurm.yaml"), "--nodes", "1", "--tasks-per-node", "2",
        "--time", "3", "--log-dir", str(tmp_path / "job"), "--wait", "--json",
        "--command", "--", "data", "from-images", str(images), str(tmp_path / "two"), *options,
        timeout=300,
    )  # fmt: skip
    folder = tmp_path / "job" / "slurm"
    logs = "\n".join(f"== {p.name}\n{p.read_text()}" for p in sorted(folder.glob("*_log.*")))
    assert job.returncode == 0, f"{job.stdout}\n{job.stderr}\n{logs}"
    result = json.loads(job.stdout)
    assert result["state"] == "COMPLETED" and [t["status"] for t in result["tasks"]] == ["ok", "ok"], result
    written, split = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert sorted(written) == sorted(split) and any(name.endswith(".mds") for name in written)
    assert [name for name in written if written[name] != split[name]] == []
    # each task encoded only its share: 5 parts of 2 images, task 0 parts 0, 2, 4 and task 1 parts 1, 3
    job_id = result["job_id"]
    task0, task1 = ((folder / f"{job_id}_{task}_log.err").read_text() for task in (0, 1))
    assert " 6/6 " in task0 and " 4/4 " in task1, logs


def test_waiting_on_a_failing_command_names_each_tasks_error_and_exits_1(slurm_cluster, tmp_path):
    job = fitscale_launch(
        "--cluster", str(REPO / "cluster" / "local-slurm.yaml"), "--tasks-per-node", "2", "--time", "3",
        "--log-dir", str(tmp_path / "job"), "--wait",
        "--command", "--", "data", "from-images", str(tmp_path / "images"), str(tmp_path / "out"),
        "--vae", str(tmp_path / "no-vae"),
        timeout=180,
    )  # fmt: skip
    assert job.returncode == 1, f"{job.stdout}\n{job.stderr}"
    error = f"fitscale data: error: --vae {tmp_path / 'no-vae'}: no such folder"
    lines = job.stdout.splitlines()
    assert " FAILED: fitscale data from-images " in lines[0], job.stdout
    # a task that fails ends the step (--kill-on-bad-exit): the other may be killed before its result
    tasks = {line.split(":")[0].strip(): line for line in lines[1:3]}
    assert sorted(tasks) == ["task 0", "task 1"], job.stdout
    failed = [line for line in tasks.values() if line.split(": ", 1)[1].startswith("failed (")]
    assert failed and all(error in line and "FailedJobError" not in line for line in failed), job.stdout
    assert all(line in failed or ": missing (no " in line for line in tasks.values()), job.stdout
    assert lines[3].startswith(f"  logs: {tmp_path / 'job' / 'slurm'}/"), job.stdout
    assert not (tmp_path / "out").exists()
