"""Start the runs of a sweep: a SLURM job array through the launcher, or one after another here.

Every run is an ordinary run folder (`<out_dir>/<run>/`) with `train.resume: auto`, so launching
a sweep again continues unfinished runs from their newest checkpoint and skips finished ones.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fitscale.checkpoint.layout import complete_steps
from fitscale.config import load_config
from fitscale.errors import UserError
from fitscale.launch.launcher import submit_sweep
from fitscale.sweep.spec import PlannedRun, SweepSpec, plan_sweep, run_dir, run_overrides

log = logging.getLogger("fitscale.sweep")


def run_status(spec: SweepSpec, run: PlannedRun) -> tuple[str, int | None]:
    """(`done` | `partial` | `new`, newest complete checkpoint step) of one run folder."""

    steps = complete_steps(run_dir(spec, run) / "checkpoints")
    if not steps:
        return "new", None
    return ("done" if steps[-1] >= run.steps else "partial"), steps[-1]


def resolved_configs(spec: SweepSpec, runs: list[PlannedRun]) -> list:
    """The RunConfig of every run (recipe + sweep overrides + the run's own), validated now."""

    configs = []
    for run in runs:
        try:
            configs.append(load_config(spec.recipe, run_overrides(spec, run)))
        except ValueError as error:
            raise UserError(f"sweep run {run.name}: {error}") from None
    return configs


def launch_sweep(
    spec: SweepSpec, cluster: str | None = None, local: bool = False, only: list[str] | None = None
) -> dict[str, str]:
    """Launch every run that is not done; returns {run name: job id, `local`, or `done`}.

    `local` trains the runs one after another in this process (single rank; the CPU demo and
    small sweeps); otherwise they go to SLURM as one job array (`fitscale.launch.launcher.submit_sweep`).
    """
    runs = plan_sweep(spec)
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            raise UserError(
                f"--only: no run named {', '.join(unknown)}; runs: {', '.join(r.name for r in runs)}"
            )
        runs = [r for r in runs if r.name in only]
    outcome: dict[str, str] = {}
    pending = []
    for run in runs:
        status, _ = run_status(spec, run)
        if status == "done":
            outcome[run.name] = "done"
        else:
            pending.append(run)
    if not pending:
        return outcome
    configs = resolved_configs(spec, pending)
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    if local:
        from fitscale.train.trainer import Trainer  # lazy: heavy

        for run, config in zip(pending, configs):
            log.info("sweep %s: training %s for %d steps", spec.name, run.name, run.steps)
            Trainer(config).train()
            outcome[run.name] = "local"
        return outcome

    job_ids = submit_sweep(configs, spec.out_dir, cluster)
    outcome.update({run.name: job_id for run, job_id in zip(pending, job_ids)})
    return outcome
