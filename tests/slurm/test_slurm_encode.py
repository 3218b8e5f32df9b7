"""`fitscale data from-images` as a SLURM job: `srun -n 2` runs the command once per task, each task
takes its rank and the world size from SLURM_PROCID / SLURM_NTASKS, and the two write the same
dataset, byte for byte, as one process does."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.images import autoencoder, files_of, random_image_folder
from slurm_runs import REPO

from fitscale.cli import main

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_two_slurm_tasks_write_the_dataset_one_process_writes(slurm_cluster, tmp_path):
    images = random_image_folder(tmp_path / "images", per_class=5)
    autoencoder("sd").save_pretrained(tmp_path / "vae")
    options = ["--vae", str(tmp_path / "vae"), "--resolution", "64", "--num-classes", "2", "--part-size", "2"]
    options += ["--workers", "0", "--device", "cpu"]
    assert main(["data", "from-images", str(images), str(tmp_path / "one"), *options, "--no-progress"]) == 0
    job = subprocess.run(
        ["srun", "--ntasks", "2", "--cpus-per-task", "1", "--time", "2", "--chdir", str(REPO),
         "--output", str(tmp_path / "task-%t.log"),
         sys.executable, "-m", "fitscale.cli", "data", "from-images", str(images), str(tmp_path / "two"), *options],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("task-*.log")))
    assert job.returncode == 0, f"{job.stderr}\n{logs}"
    written, split = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert sorted(written) == sorted(split) and any(name.endswith(".mds") for name in written)
    assert [name for name in written if written[name] != split[name]] == []
    # each task encoded only its share (its progress bar's total): 5 parts of 2 images, task 0
    # (SLURM_PROCID 0) parts 0, 2, 4 and task 1 parts 1, 3
    task0, task1 = (p.read_text() for p in sorted(tmp_path.glob("task-*.log")))
    assert " 6/6 " in task0 and " 4/4 " in task1, logs
