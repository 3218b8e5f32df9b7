"""`fitscale launch --command -- ARGS...`: any fitscale command as a SLURM job over nodes x tasks.

Training has its recipe form (`fitscale launch RECIPE`, fitscale.launch.launcher). Other commands
that already split their work over SLURM tasks (`data from-images` reads SLURM_PROCID/SLURM_NTASKS,
`eval` joins a process group from the SLURM environment through fitscale.runtime.env) are submitted
here with the same cluster profile, resources and sbatch script: every task runs
`python -m fitscale.cli ARGS...` as a subprocess (submitit's CommandFunction), in the directory
`fitscale launch` was started from, with the profile's env exported by the batch script. The
dispatcher is never imported here (it sits above launch). Logs go to `<log_dir>/slurm/` as a
run's go to `<run_dir>/slurm/`.
"""

from __future__ import annotations

import pickle
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitscale.config.launch import ClusterProfile, LaunchConfig, Resources, resolve_resources
from fitscale.errors import UserError
from fitscale.launch.launcher import resources_summary
from fitscale.launch.profiles import load_profile
from fitscale.launch.slurm import build_executor, import_submitit, sbatch_parameters, sbatch_script, submit
from fitscale.runtime import rundir

# Commands with their own way to SLURM: the recipe form of `fitscale launch`.
RECIPE_COMMANDS = ("launch", "train")


@dataclass
class CommandPlan:
    """A fitscale command resolved for one SLURM cluster; nothing has been submitted yet."""

    argv: list[str]
    profile: ClusterProfile
    resources: Resources
    log_dir: Path
    job_name: str
    cwd: Path
    sbatch_params: dict[str, Any] = field(default_factory=dict)

    @property
    def slurm_folder(self) -> Path:
        """Where submitit writes the job's pickles and each task's `<job>_<task>_log.out/.err`."""
        return rundir.slurm_folder(self.log_dir)

    def task_command(self) -> list[str]:
        """What every task runs: this interpreter on the command-line entry point, with `argv`."""
        return [sys.executable, "-m", "fitscale.cli", *self.argv]

    def summary(self) -> dict[str, Any]:
        """The plan as plain data: command, cluster, resources, log folder."""
        return {
            "command": shlex.join(["fitscale", *self.argv]),
            "cluster": self.profile.name,
            "job_name": self.job_name,
            **resources_summary(self.resources),
            "cwd": str(self.cwd),
            "log_dir": str(self.log_dir),
        }


def check_command(argv: list[str]) -> list[str]:
    """`argv` without a leading `--`; UserError for an empty command or one with a recipe form."""
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UserError(
            "--command: no command given; write the fitscale command after it, "
            "e.g. --command -- data from-images IMAGES OUT --vae VAE"
        )
    if argv[0] in RECIPE_COMMANDS:
        raise UserError(
            f"--command {argv[0]}: training is launched from its recipe; "
            "use `fitscale launch RECIPE --cluster PROFILE` instead"
        )
    return list(argv)


def default_job_name(argv: list[str]) -> str:
    """`fitscale-<subcommand words>`, e.g. fitscale-data-from-images."""
    words = [word for word in argv[:2] if not word.startswith("-")]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(["fitscale", *words]))


def plan_command(
    argv: list[str],
    cluster: str,
    log_dir: str | Path,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    tasks_per_node: int | None = None,
    time_min: int | None = None,
    job_name: str | None = None,
) -> CommandPlan:
    """Resolve `fitscale ARGV` for a SLURM cluster profile; UserError for a bad command, a profile
    without SLURM (`scheduler: local`) or a time limit (minutes) not longer than the warning signal's
    lead (a command cannot checkpoint: submitit stops it there), ConfigError for resources the
    profile does not allow. The job is requeued after a preemption (the command reruns from the
    start), never after its time limit."""
    argv = check_command(argv)
    profile = load_profile(cluster)
    if profile.scheduler != "slurm":
        raise UserError(
            f"--command: cluster profile {profile.name!r} has scheduler: {profile.scheduler}, "
            "not slurm; run the command here (`fitscale " + argv[0] + " ...`) or pass a SLURM profile"
        )
    launch = LaunchConfig(
        cluster=cluster,
        nodes=1 if nodes is None else nodes,
        gpus_per_node=gpus_per_node,
        tasks_per_node=tasks_per_node,
        time_min=time_min,
        max_timeout_requeues=0,  # a command is no checkpointing run: it ends at the time limit
    )
    resources = resolve_resources(launch, profile)
    if launch.signal_delay_s >= resources.time_min * 60:
        # submitit stops a task that cannot checkpoint at SLURM's warning signal, before the limit
        raise UserError(
            f"--command: a time limit of {resources.time_min} min leaves no time: the tasks are stopped at "
            f"SLURM's warning, {launch.signal_delay_s} s before the limit; give --time "
            f"{launch.signal_delay_s // 60 + 1} or more"
        )
    name = job_name or default_job_name(argv)
    import_submitit()
    return CommandPlan(
        argv=argv,
        profile=profile,
        resources=resources,
        log_dir=Path(log_dir).expanduser().resolve(),
        job_name=name,
        cwd=Path.cwd(),
        sbatch_params=sbatch_parameters(profile, launch, resources, name),
    )


def render_command_sbatch(plan: CommandPlan) -> str:
    """The batch script `submit_command` would submit; works on a machine without SLURM."""
    return sbatch_script(plan.slurm_folder, plan.sbatch_params)


def submit_command(plan: CommandPlan):
    """Submit the command's job (one CommandFunction per task); returns the submitit Job.

    FileNotFoundError without SLURM here, SubmissionError when sbatch refuses the job.
    """
    submitit = import_submitit()
    executor = build_executor(plan.slurm_folder, plan.sbatch_params, 0)
    # env=None: each task's own environment (SLURM_PROCID, the profile's exports), not this one's
    function = submitit.helpers.CommandFunction(plan.task_command(), cwd=plan.cwd)
    job = submit(executor, function)
    rundir.append_launch_record(
        plan.log_dir,
        {
            "job_id": job.job_id,
            "scheduler": "slurm",
            "slurm_folder": str(plan.slurm_folder),
            **plan.summary(),
        },
    )
    return job


def task_statuses(folder: str | Path, job_id: str, tasks: int) -> list[dict[str, Any]]:
    """Each task's end from submitit's result pickles: {task, status: ok|failed|missing, detail}.

    `detail` is the last line of a failed task's stderr (CommandFunction raises with it).
    """
    statuses = []
    for task in range(tasks):
        path = Path(folder) / f"{job_id}_{task}_result.pkl"
        if not path.is_file():
            statuses.append({"task": task, "status": "missing", "detail": f"no {path.name}"})
            continue
        with open(path, "rb") as handle:
            outcome, value = pickle.load(handle)
        lines = [line for line in str(value).splitlines() if line.strip()]
        detail = lines[-1].strip() if outcome != "success" and lines else ""
        detail = re.sub(r"^[\w.]*FailedJobError: ", "", detail)  # the command's own last stderr line
        statuses.append(
            {"task": task, "status": "ok" if outcome == "success" else "failed", "detail": detail}
        )
    return statuses
