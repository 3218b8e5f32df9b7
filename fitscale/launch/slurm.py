"""Submitting runs to SLURM with submitit, following them, and explaining how they ended.

One submitit folder per run (`<run_dir>/slurm/`, see `fitscale.runtime.rundir`); job arrays put
many runs of a sweep in one submission. SLURM's accounting (`sacct`) is optional: job states
come from `scontrol show job` while the controller remembers the job, then from `sacct`.
"""

from __future__ import annotations

import pickle
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitscale.compat import SUBMITIT_TASK_MODULE, sbatch_parameter_names, sbatch_string
from fitscale.config.launch import ClusterProfile, LaunchConfig, Resources
from fitscale.launch.job import TrainingJob
from fitscale.runtime import rundir
from fitscale.runtime.failures import slurm_first_failure

# States after which SLURM will not run the job again (a requeued job goes back to PENDING).
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
    "REVOKED",
    "SPECIAL_EXIT",
}
# A task that fails takes the step down at once, instead of leaving the others in a collective.
DEFAULT_SRUN_ARGS = ("--kill-on-bad-exit=1",)


def import_submitit():
    """The submitit module, or ImportError saying how to install it (`fitscale[slurm]`)."""
    try:
        import submitit
    except ImportError as error:
        raise ImportError(
            "submitting to SLURM needs submitit: pip install 'fitscale[slurm]' (or pip install submitit)"
        ) from error
    return submitit


def sbatch_parameters(
    profile: ClusterProfile, launch: LaunchConfig, resources: Resources, job_name: str
) -> dict:
    """submitit SlurmExecutor parameters: the profile, then the run's launch section on top."""
    setup = list(profile.setup)
    setup += [f"export {name}={shlex.quote(str(value))}" for name, value in profile.env.items()]
    params: dict[str, Any] = {
        "job_name": job_name,
        "nodes": resources.nodes,
        "ntasks_per_node": resources.tasks_per_node,
        "cpus_per_task": resources.cpus_per_task,
        "time": resources.time_min,
        "signal_delay_s": launch.signal_delay_s,
        "setup": setup,
        "srun_args": [*DEFAULT_SRUN_ARGS, *profile.srun_args],
        # Requeueable explicitly: some clusters default to JobRequeue=0.
        "additional_parameters": {"requeue": True},
    }
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(profile, name):
            params[name] = getattr(profile, name)
    if profile.mem_gb is not None:
        params["mem"] = "0" if profile.mem_gb == 0 else f"{int(profile.mem_gb * 1024)}M"
    if profile.exclusive:
        params["exclusive"] = True
    known = sbatch_parameter_names()
    for extra in (profile.sbatch, launch.sbatch):
        for name, value in extra.items():
            key = name.replace("-", "_")
            if key in known:
                params[key] = value
            else:  # any other sbatch option, written as `#SBATCH --name=value`
                params["additional_parameters"][key] = value
    return params


def task_python() -> str:
    """The interpreter each task runs, started with SIGUSR2 ignored until submitit installs its handler.

    SLURM's time-limit warning can arrive while Python is still starting; its default action would
    kill the task (and the job with it) instead of letting it checkpoint and requeue.
    """
    return f'bash -c \'trap "" USR2; exec "$0" "$@"\' {shlex.quote(sys.executable)}'


def task_command(folder: str | Path) -> str:
    """The command every task of the job runs: submitit's entry point on the job's pickle folder."""
    return " ".join([task_python(), f"-u -m {SUBMITIT_TASK_MODULE}", shlex.quote(str(folder))])


def require_slurm() -> None:
    """Raise FileNotFoundError, naming what to do instead, when this machine has no SLURM client."""
    missing = [name for name in ("sbatch", "srun") if shutil.which(name) is None]
    if missing:
        raise FileNotFoundError(
            f"no SLURM on this machine ({' and '.join(missing)} not on PATH); submit from a SLURM login node, "
            "check the job here with --dry-run, or run on this machine with --cluster local"
        )


def build_executor(folder: str | Path, params: dict, max_timeout_requeues: int):
    """A submitit SlurmExecutor for these sbatch parameters; FileNotFoundError without SLURM here."""
    submitit = import_submitit()
    require_slurm()
    executor = submitit.SlurmExecutor(
        folder=folder, max_num_timeout=max_timeout_requeues, python=task_python()
    )
    executor.update_parameters(**params)
    return executor


def sbatch_script(folder: str | Path, params: dict) -> str:
    """The batch script `build_executor(folder, params, ...)` submits (for `--dry-run`; needs no SLURM here)."""
    folder = Path(folder).expanduser().absolute()  # as submitit's executor holds it
    return sbatch_string(command=task_command(folder), folder=folder, **params)


class SubmissionError(RuntimeError):
    """sbatch refused the job (unknown partition, account, QOS, too many resources...)."""


def _sbatch_refusal(error: Exception) -> SubmissionError:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = "; ".join(lines[-2:]) if lines else type(error).__name__
    return SubmissionError(
        f"sbatch refused the job: {reason}; check the cluster profile (partition, account, qos)"
    )


def submit(executor, job: TrainingJob):
    """Submit one run; returns the submitit Job (its `job_id` is SLURM's)."""
    submitit = import_submitit()
    try:
        return executor.submit(job)
    except (submitit.core.utils.FailedJobError, OSError) as error:
        raise _sbatch_refusal(error) from error


def submit_array(executor, jobs: Sequence[TrainingJob]) -> list:
    """Submit many runs as one SLURM job array (for sweeps); one submitit Job per run, in order.

    Every run keeps its own run folder (checkpoints, metrics, lock); the array's logs live in the
    executor's folder. Each array task requeues on its own.
    """
    submitit = import_submitit()
    try:
        with executor.batch():
            submitted = [executor.submit(job) for job in jobs]
    except (submitit.core.utils.FailedJobError, OSError) as error:
        raise _sbatch_refusal(error) from error
    return submitted


# ------------------------------------------------------------------------------------------ state


def _run(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout if result.returncode == 0 else None


def job_state(job_id: str) -> str:
    """SLURM's state of a job (PENDING, RUNNING, COMPLETED, FAILED, ...), or UNKNOWN.

    Not submitit's `Job.state`: that reads `sacct` only (submitit 1.5.4), which clusters without
    SLURM accounting lack; the controller's `scontrol show job` answers while it remembers the job.
    """
    out = _run(["scontrol", "show", "job", "--oneliner", str(job_id)])
    if out:
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
    out = _run(
        ["sacct", "--noheader", "--allocations", "--parsable2", "--jobs", str(job_id), "--format=State"]
    )
    if out and out.strip():
        return out.split()[0].split("+")[0]  # "CANCELLED by 0" -> "CANCELLED"
    return "UNKNOWN"


@dataclass
class JobOutcome:
    """How a SLURM job ended: its id, final state, the failure reason (empty when none) and its result."""

    job_id: str
    state: str
    reason: str = ""
    result: Any = None

    @property
    def ok(self) -> bool:
        """Whether the job completed with no failure reason."""
        return self.state == "COMPLETED" and not self.reason


def failure_reason(folder: str | Path, job_id: str, max_lines: int = 1) -> str:
    """Why a job failed: the first failing rank's line (fitscale.runtime.failures), else from its
    tasks' result pickles (submitit stores the traceback) or their logs."""

    folder = Path(folder)
    report = slurm_first_failure(folder, job_id)
    if report is not None:
        return report["message"]  # the line a local launch prints
    for path in sorted(folder.glob(f"{job_id}_*_result.pkl")):
        try:
            with open(path, "rb") as handle:
                status, value = pickle.load(handle)
        except Exception:
            continue
        if status == "error":
            lines = [line for line in str(value).strip().splitlines() if line.strip()]
            task = path.name[len(job_id) + 1 :].split("_")[0]
            return f"task {task}: " + " | ".join(lines[-max_lines:])
    for path in sorted(folder.glob(f"{job_id}_*_log.err")):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error:" in line]
        if errors:
            return f"{path.name}: {errors[-1].strip()}"
    return ""


def read_result(folder: str | Path, job_id: str) -> Any:
    """Task 0's return value from submitit's result pickle in `folder`, or None when absent or failed."""
    path = Path(folder) / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        status, value = pickle.load(handle)
    return value if status == "success" else None


def wait_for_job(
    job_id: str, folder: str | Path, poll_s: float = 2.0, timeout_s: float | None = None
) -> JobOutcome:
    """Follow a job through requeues until SLURM is done with it; returns its state and, if any, why it failed."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = job_state(job_id)
        if state in TERMINAL_STATES:
            break
        if state == "UNKNOWN" and (Path(folder) / f"{job_id}_0_result.pkl").is_file():
            state = "COMPLETED"
            break
        if deadline is not None and time.monotonic() > deadline:
            return JobOutcome(job_id, state, f"still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)
    reason = "" if state == "COMPLETED" else failure_reason(folder, job_id)
    result = read_result(folder, job_id)
    if state == "COMPLETED" and result is None:
        reason = failure_reason(folder, job_id) or "the job completed without a result"
    return JobOutcome(job_id, state, reason, result)


def active_job(run_dir: str | Path) -> tuple[str, str] | None:
    """(job id, state) of a SLURM job launched on this run folder that SLURM may still run, else None."""
    for record in reversed(rundir.launch_records(run_dir)):
        job_id = record.get("job_id")
        if record.get("scheduler") != "slurm" or not job_id:
            continue
        state = job_state(str(job_id))
        if state not in TERMINAL_STATES and state != "UNKNOWN":
            return str(job_id), state
        return None
    return None
