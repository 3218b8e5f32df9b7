"""`fitscale launch --command -- ARGS`: any fitscale command as a SLURM job. What needs no cluster:
the refusals (one line each, status 2) and the dry run's plan and batch script."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from fitscale.cli import main

REPO = Path(__file__).resolve().parents[2]
PROFILE = str(REPO / "cluster" / "local-slurm.yaml")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cluster", PROFILE, "--command"], "--command: no command given; write the fitscale command after it"),
        (["--cluster", PROFILE, "--command", "--"], "--command: no command given"),
        (["--cluster", PROFILE, "--command", "--", "train", "r.yaml"], "--command train: training is launched from its recipe; use `fitscale launch RECIPE"),
        (["--cluster", PROFILE, "--command", "--", "launch", "r.yaml"], "--command launch: training is launched from its recipe"),
        (["--cluster", PROFILE, "--time", "2", "--command", "--", "eval", "x"], "--command: a time limit of 2 min leaves no time: the tasks are stopped at SLURM's warning, 120 s before the limit; give --time 3 or more"),
        (["--cluster", "local", "--command", "--", "eval", "x"], "--command: cluster profile 'local' has scheduler: local, not slurm"),
        (["--command", "--", "eval", "x"], "--command: --cluster PROFILE is required"),
        (["--cluster", PROFILE, "--set", "a=1", "--command", "--", "eval", "x"], "--command: --set applies to recipes only"),
        ([], "give one RECIPE, or --command -- ARGS to submit another fitscale command"),
    ],
)  # fmt: skip
def test_bad_commands_are_refused_in_one_line(argv, message, capsys):
    assert main(["launch", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fitscale launch: error: ") and message in err and "\n" not in err, err


def test_dry_run_prints_the_task_command_and_the_batch_script(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["data", "from-images", "IMAGES", "OUT", "--vae", "V", "--resolution", "64"]
    code = main(
        ["launch", "--cluster", PROFILE, "--nodes", "1", "--tasks-per-node", "2", "--log-dir", "logs",
         "--dry-run", "--json", "--command", "--", *argv]
    )  # fmt: skip
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["task_command"] == [sys.executable, "-m", "fitscale.cli", *argv]
    assert plan["world_size"] == 2 and plan["job_name"] == "fitscale-data-from-images"
    assert plan["cwd"] == str(tmp_path) and plan["log_dir"] == str(tmp_path / "logs")
    script = plan["sbatch"]
    assert (
        "#SBATCH --ntasks-per-node=2" in script and "export OMP_NUM_THREADS=1" in script
    )  # the profile's env
    assert f"--output {tmp_path}/logs/slurm/%j_%t_log.out" in script
    assert not (tmp_path / "logs").exists()  # a dry run writes nothing


def test_the_recipe_form_is_unchanged(capsys):
    code = main(["launch", str(REPO / "recipes" / "demo.yaml"), "--cluster", PROFILE, "--dry-run", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["job_name"] == "fitscale-demo"


def test_submitting_a_command_without_slurm_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", os.devnull)  # no sbatch, no srun
    argv = [
        "launch",
        "--cluster",
        PROFILE,
        "--log-dir",
        str(tmp_path / "logs"),
        "--command",
        "--",
        "eval",
        "x",
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith(
        "fitscale launch: error: no SLURM on this machine (sbatch and srun"
    )
    assert not (tmp_path / "logs").exists()
