"""`fitscale launch`: resolve a run for a cluster, check it, and submit it (or run it here).

`plan_launch` does everything that can go wrong before a job exists: loads the recipe with its
overrides, finds the cluster profile, merges resources, checks that the run fits the topology,
and renders the batch script. `run_plan` then submits it with submitit (SLURM profiles) or runs
the ranks on this machine (`scheduler: local`, also one node of a multi-node job without SLURM).
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitscale.config import load_config, to_yaml
from fitscale.config.errors import ConfigError
from fitscale.config.launch import ClusterProfile, Resources, resolve_resources
from fitscale.errors import UserError
from fitscale.launch.job import TrainingJob, make_signals_exit
from fitscale.launch.profiles import load_profile
from fitscale.launch.slurm import (
    active_job,
    build_executor,
    import_submitit,
    require_slurm,
    sbatch_parameters,
    sbatch_script,
    submit,
    submit_array,
)
from fitscale.runtime import rundir
from fitscale.runtime.failures import run_ranks
from fitscale.runtime.local import python_module_command
from fitscale.train.preflight import check_before_launch, check_data_before_launch, world_size_problems


@dataclass
class LaunchPlan:
    """A run resolved for one cluster; nothing has been submitted yet."""

    config: Any  # fitscale.config.RunConfig
    config_yaml: str
    profile: ClusterProfile
    resources: Resources
    run_dir: Path
    job_name: str
    sbatch_params: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The plan as plain data: cluster, run folder, job name, resources, requeue and signal
        settings, problems.
        """
        return {
            "cluster": self.profile.name,
            "scheduler": self.profile.scheduler,
            "run_dir": str(self.run_dir),
            "job_name": self.job_name,
            **resources_summary(self.resources),
            "max_timeout_requeues": self.config.launch.max_timeout_requeues,
            "signal_delay_s": self.config.launch.signal_delay_s,
            "problems": list(self.problems),
        }


def resources_summary(r: Resources) -> dict[str, int]:
    """Nodes, tasks, GPUs and CPUs per node/task, world size and time limit (minutes) as plain data."""
    names = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "world_size", "time_min")
    return {name: getattr(r, name) for name in names}


def launch_overrides(
    cluster: str | None = None,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    tasks_per_node: int | None = None,
    time_min: int | None = None,
) -> list[str]:
    """Command-line flags as `launch.*` overrides (they win over the recipe's launch section)."""
    values = {
        "cluster": cluster,
        "nodes": nodes,
        "gpus_per_node": gpus_per_node,
        "tasks_per_node": tasks_per_node,
        "time_min": time_min,
    }
    return [f"launch.{name}={value}" for name, value in values.items() if value is not None]


def check_topology(config, resources: Resources, profile: ClusterProfile) -> list[str]:
    """Reasons this run cannot work on these resources, each naming what to change."""
    shape = f"{resources.nodes} node(s) x {resources.tasks_per_node} task(s)"
    problems = world_size_problems(config, resources.world_size, shape, resources.tasks_per_node)
    if config.train.device == "cuda" and resources.gpus_per_node == 0:
        problems.append(
            f"train.device=cuda but cluster profile {profile.name!r} requests no GPUs; "
            "set --gpus-per-node or train.device=cpu"
        )
    if profile.scheduler == "slurm" and config.launch.signal_delay_s >= resources.time_min * 60:
        problems.append(
            f"launch.signal_delay_s={config.launch.signal_delay_s} is not shorter than the time limit "
            f"({resources.time_min} min); lower it or raise launch.time_min"
        )
    return problems


def plan_launch(recipe: str | Path, overrides: list[str] | tuple[str, ...] = (), **flags: Any) -> LaunchPlan:
    """Resolve `recipe` + `overrides` + flags (cluster, nodes, gpus_per_node, tasks_per_node, time_min)."""

    config = load_config(recipe, [*overrides, *launch_overrides(**flags)])
    profile = load_profile(config.launch.cluster)
    resources = resolve_resources(config.launch, profile)
    # Jobs start in other working directories (and requeue later): pin the run folder.
    run_dir = Path(config.train.run_dir).expanduser().resolve()
    config.train.run_dir = str(run_dir)
    if profile.scheduler == "slurm":
        make_signals_exit(config)
    job_name = config.launch.job_name or f"fitscale-{run_dir.name}"
    plan = LaunchPlan(
        config=config,
        config_yaml=to_yaml(config),
        profile=profile,
        resources=resources,
        run_dir=run_dir,
        job_name=job_name,
        problems=check_topology(config, resources, profile),
    )
    if profile.scheduler == "slurm":
        import_submitit()
        plan.sbatch_params = sbatch_parameters(profile, config.launch, resources, job_name)
    return plan


def render_sbatch(plan: LaunchPlan) -> str:
    """The batch script `submit_plan` would submit; works on a machine without SLURM."""

    return sbatch_script(rundir.slurm_folder(plan.run_dir), plan.sbatch_params)


def check_plan(plan: LaunchPlan, lock: bool) -> None:
    """Everything that needs no process group, before any rank or job exists: the topology, the
    backend, the trainable patterns, the datasets, (with `lock`) the run folder, and a resume that
    changes a field that may not change; ConfigError."""

    if plan.problems:
        raise ConfigError("; ".join(plan.problems))
    check_before_launch(plan.config, plan.resources.world_size, lock=lock)
    # the job reads an s3:// endpoint and credentials from the profile's env: the check does too
    saved = {key: os.environ.get(key) for key in plan.profile.env}
    os.environ.update({key: str(value) for key, value in plan.profile.env.items()})
    try:
        check_data_before_launch(plan.config)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def submit_plan(plan: LaunchPlan):
    """Submit to SLURM; returns the submitit Job. Refuses a run folder whose previous job may still run."""

    if plan.problems:
        raise ConfigError("; ".join(plan.problems))
    require_slurm()
    check_plan(plan, lock=False)  # the lock is the job's to take, on its node
    active = active_job(plan.run_dir)
    if active is not None:
        raise ConfigError(
            f"run folder {str(plan.run_dir)!r} already has SLURM job {active[0]} ({active[1]}); wait for it, "
            f"`scancel {active[0]}`, or choose another train.run_dir"
        )
    folder = rundir.slurm_folder(plan.run_dir)
    executor = build_executor(folder, plan.sbatch_params, plan.config.launch.max_timeout_requeues)
    job = submit(executor, TrainingJob(plan.config_yaml, str(plan.run_dir)))
    rundir.append_launch_record(
        plan.run_dir,
        {
            "job_id": job.job_id,
            "scheduler": "slurm",
            "slurm_folder": str(folder),
            "command": shlex.join(sys.argv),
            **plan.summary(),
        },
    )
    return job


def run_local(
    plan: LaunchPlan,
    recipe: str | Path,
    overrides: list[str] | tuple[str, ...],
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
) -> int:
    """Run the plan's ranks on this machine (one node of `resources.nodes`); returns the exit code."""

    if plan.resources.nodes > 1 and master_port is None:
        raise UserError("a multi-node launch needs an explicit master_port that every node agrees on")
    check_plan(plan, lock=True)
    args = ["train", str(recipe), "--set", *overrides, f"train.run_dir={plan.run_dir}"]
    rundir.append_launch_record(
        plan.run_dir,
        {"scheduler": "local", "node_rank": node_rank, "command": shlex.join(sys.argv), **plan.summary()},
    )
    run_ranks(
        python_module_command("fitscale.cli", *args),
        plan.resources.tasks_per_node,
        plan.run_dir,
        nnodes=plan.resources.nodes,
        node_rank=node_rank,
        master_addr=master_addr,
        master_port=master_port,
        env={**plan.profile.env, "FITSCALE_LAUNCHED": "1"},
    )
    return 0


def submit_sweep(configs: list, folder: str | Path, cluster: str | None = None) -> list[str]:
    """Submit many resolved RunConfigs (each with its own `train.run_dir`) as one SLURM job array.

    For `fitscale sweep launch`: every config must ask for the same resources (a job array has one
    shape); the array's logs go to `<folder>/slurm/`, each run's checkpoints and metrics to its own
    run folder. Returns the job ids in the order of `configs` (`<array id>_<index>`).
    """

    if not configs:
        raise ValueError("submit_sweep needs at least one config")
    first = configs[0].launch
    for index, config in enumerate(configs):
        if config.launch != first:
            raise ConfigError(
                f"sweep run {index} has launch settings {config.launch} but run 0 has {first}; "
                "one job array needs the same launch section for every run"
            )
    profile = load_profile(cluster or first.cluster)
    if profile.scheduler != "slurm":
        raise ConfigError(f"cluster profile {profile.name!r} is not a SLURM cluster; job arrays need one")
    resources = resolve_resources(first, profile)
    jobs, run_dirs = [], []
    for config in configs:
        run_dir = Path(config.train.run_dir).expanduser().resolve()
        config.train.run_dir = str(run_dir)
        make_signals_exit(config)
        problems = check_topology(config, resources, profile)
        if problems:
            raise ConfigError(f"sweep run {run_dir.name}: " + "; ".join(problems))
        jobs.append(TrainingJob(to_yaml(config), str(run_dir)))
        run_dirs.append(run_dir)
    folder = Path(folder)
    params = sbatch_parameters(profile, first, resources, first.job_name or f"fitscale-sweep-{folder.name}")
    executor = build_executor(rundir.slurm_folder(folder), params, first.max_timeout_requeues)
    submitted = submit_array(executor, jobs)
    for job, run_dir in zip(submitted, run_dirs):
        rundir.append_launch_record(
            run_dir,
            {"job_id": job.job_id, "scheduler": "slurm", "slurm_folder": str(rundir.slurm_folder(folder))},
        )
    return [job.job_id for job in submitted]
