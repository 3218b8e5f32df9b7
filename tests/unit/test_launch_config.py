"""Launch plumbing that needs no cluster: rank discovery, profiles, resources, `--dry-run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fitscale.config.errors import ConfigError
from fitscale.config.launch import ClusterProfile, LaunchConfig, resolve_resources
from fitscale.launch.profiles import load_profile
from fitscale.runtime.env import (
    expand_tasks_per_node,
    export_torch_env,
    first_hostname,
    init_distributed_from_env,
    master_port_for_job,
    rank_info_from_env,
)

REPO = Path(__file__).resolve().parents[2]

SLURM_STEP = {
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_NTASKS": "4",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NODELIST": "gpu[007-008]",
    "SLURM_JOB_NODELIST": "gpu[007-008]",
}


def test_slurm_step_gives_ranks_master_on_first_node_and_job_port():
    info = rank_info_from_env(SLURM_STEP)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (3, 4, 1, 2)
    assert (info.node_rank, info.num_nodes, info.source) == (1, 2, "slurm")
    assert info.master_addr == "gpu007"
    assert info.master_port == 20000 + 123456 % 10000
    environ: dict[str, str] = {}
    export_torch_env(info, environ)
    assert environ["RANK"] == "3" and environ["WORLD_SIZE"] == "4" and environ["LOCAL_WORLD_SIZE"] == "2"
    assert environ["MASTER_ADDR"] == "gpu007" and environ["MASTER_PORT"] == str(info.master_port)


def test_torchrun_variables_win_over_slurm_and_batch_script_is_one_process():
    torchrun = {**SLURM_STEP, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}  # fmt: skip
    info = rank_info_from_env(torchrun)
    assert (info.rank, info.world_size, info.num_nodes, info.source) == (5, 8, 2, "torchrun")
    batch_script = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_ID"}
    assert rank_info_from_env(batch_script).world_size == 1


def test_a_lone_process_joins_without_touching_the_environment(monkeypatch):
    for name in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_PROCID",
        "SLURM_STEP_ID",
    ):
        monkeypatch.delenv(name, raising=False)
    before = dict(os.environ)
    info = init_distributed_from_env(device="cpu")
    assert (info.rank, info.world_size, info.source) == (0, 1, "single")
    assert dict(os.environ) == before  # else a later in-process command takes itself for a launched rank


@pytest.mark.parametrize(
    "spec, counts", [("2", [2]), ("2(x3)", [2, 2, 2]), ("4(x2),1", [4, 4, 1]), ("1,3", [1, 3])]
)
def test_slurm_tasks_per_node_expand(spec, counts):
    assert expand_tasks_per_node(spec) == counts


def test_first_hostname_with_or_without_scontrol(monkeypatch):
    assert first_hostname("node[12-14,20],login1") == "node12"
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: submitit's parser
    assert first_hostname("a-[09-10]") == "a-09"


def test_master_port_stays_below_the_ephemeral_range():
    ports = {master_port_for_job(job) for job in range(1000, 60000, 7)}
    assert min(ports) >= 20000 and max(ports) < 30000
    with pytest.raises(ValueError, match="no digits"):
        master_port_for_job("abc")


def test_profiles_in_cluster_folder_load():
    assert load_profile("local").scheduler == "local"
    slurm = load_profile("local-slurm")
    assert (slurm.scheduler, slurm.tasks_per_node, slurm.gpus_per_node) == ("slurm", 2, 0)
    example = load_profile("example-cluster")
    assert example.gpus_per_node == 8 and example.exclusive and example.setup


def test_profile_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("scheduler: slurm\ngpus_per_nod: 8\n")
    with pytest.raises(ConfigError, match=r"typo.yaml.*gpus_per_nod"):
        load_profile(str(bad))
    with pytest.raises(FileNotFoundError, match="known profiles: .*local-slurm"):
        load_profile("no-such-cluster")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("scheduler: pbs\n")
    with pytest.raises(ConfigError, match="wrong.yaml': scheduler: 'pbs' is not one of slurm, local$"):
        load_profile(str(wrong))


def test_resources_merge_profile_and_launch_section():
    gpu = ClusterProfile(name="gpu", gpus_per_node=8, cpus_per_task=6, time_min=60, max_nodes=4)
    resources = resolve_resources(LaunchConfig(nodes=4), gpu)
    assert (resources.world_size, resources.tasks_per_node, resources.time_min) == (32, 8, 60)
    assert resolve_resources(LaunchConfig(gpus_per_node=4, time_min=5), gpu).world_size == 4
    with pytest.raises(ConfigError, match="one task per GPU"):
        resolve_resources(LaunchConfig(tasks_per_node=2), gpu)
    with pytest.raises(ConfigError, match="exceeds the max_nodes=4 of cluster profile 'gpu'"):
        resolve_resources(LaunchConfig(nodes=5), gpu)
    cpu = ClusterProfile(name="cpu", tasks_per_node=3)
    assert resolve_resources(LaunchConfig(nodes=2), cpu).world_size == 6


def fitscale(*args: str) -> subprocess.CompletedProcess:
    """The CLI on a machine without SLURM: nothing on PATH, whether or not this one has SLURM."""
    env = {**os.environ, "PATH": os.devnull}
    return subprocess.run(
        [sys.executable, "-m", "fitscale.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_dry_run_prints_resources_batch_script_and_config(tmp_path):
    result = fitscale(
        "launch", "recipes/demo.yaml", "--cluster", "example-cluster", "--nodes", "4",
        "--set", f"train.run_dir={tmp_path / 'xl'}", "launch.tasks_per_node=null", "--dry-run", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["world_size"], plan["nodes"], plan["gpus_per_node"], plan["problems"]) == (32, 4, 8, [])
    script = plan["sbatch"]
    for line in (
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --account=my-project",
        "#SBATCH --partition=gpu",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=1440",
        "#SBATCH --mail-type=FAIL",
        "module load cuda/12.4 nccl",
        "export NCCL_SOCKET_IFNAME=ib0",
        f"#SBATCH --output={tmp_path / 'xl'}/slurm/%j_0_log.out",
    ):
        assert line in script, line
    assert "--kill-on-bad-exit=1" in script and "--cpu-bind=none" in script
    assert "SIGUSR2" in plan["config"].split("exit_signals:")[1].split("signal_check_every")[0]
    assert not (tmp_path / "xl").exists(), "a dry run must not create the run folder"


def test_dry_run_rejects_a_batch_that_does_not_divide_over_ranks(tmp_path):
    result = fitscale(
        "launch", "recipes/demo.yaml", "--cluster", "example-cluster", "--nodes", "3",
        "--set", f"train.run_dir={tmp_path}", "launch.tasks_per_node=null", "--dry-run",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "fitscale launch: error: data.global_batch_size=32 does not divide over 24 ranks "
        "(3 node(s) x 8 task(s)); set it to a multiple of 24"
    )


def test_submitting_without_slurm_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from fitscale.cli import main

    monkeypatch.setenv("PATH", os.devnull)  # no sbatch, no srun
    recipe = str(REPO / "recipes" / "demo.yaml")
    assert (
        main(["launch", recipe, "--cluster", "local-slurm", "--set", f"train.run_dir={tmp_path / 'run'}"])
        == 2
    )
    assert capsys.readouterr().err == (
        "fitscale launch: error: no SLURM on this machine (sbatch and srun not on PATH); submit from a SLURM "
        "login node, check the job here with --dry-run, or run on this machine with --cluster local\n"
    )
    assert not (tmp_path / "run").exists()


def test_dry_run_script_is_the_one_submitit_submits(tmp_path, monkeypatch):
    import submitit
    from submitit.slurm.slurm import SlurmExecutor

    from fitscale.launch.slurm import sbatch_parameters, sbatch_script, task_python

    profile = load_profile("example-cluster")
    launch = LaunchConfig(cluster="example-cluster", nodes=2)
    params = sbatch_parameters(profile, launch, resolve_resources(launch, profile), "fitscale-xl")
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # as if srun were here
    executor = submitit.SlurmExecutor(folder=tmp_path / "slurm", max_num_timeout=3, python=task_python())
    executor.update_parameters(**params)
    submitted = executor._make_submission_file_text(executor._submitit_command_str, "uid")
    assert sbatch_script(tmp_path / "slurm", params) == submitted
    assert "#SBATCH --nodes=2" in submitted and "submitit.core._submit" in submitted


def test_sweep_array_needs_one_launch_shape(tmp_path):
    from fitscale.config import load_config
    from fitscale.launch.launcher import submit_sweep

    base = ["data.path=/data", "data.num_classes=10", "model.name=tiny"]
    configs = [
        load_config(None, [*base, f"train.run_dir={tmp_path / 'a'}", "launch.cluster=local-slurm"]),
        load_config(
            None, [*base, f"train.run_dir={tmp_path / 'b'}", "launch.cluster=local-slurm", "launch.nodes=2"]
        ),
    ]
    with pytest.raises(ConfigError, match="one job array needs the same launch section"):
        submit_sweep(configs, tmp_path / "sweep")
    with pytest.raises(ConfigError, match="'local' is not a SLURM cluster"):
        submit_sweep([load_config(None, [*base, f"train.run_dir={tmp_path / 'c'}"])], tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()
