"""Start the runs of a sweep: a SLURM job array through the launcher, or one after another here.

Every run is an ordinary run folder (`<out_dir>/<run>/`) with `train.resume: auto`, so launching
a sweep again continues unfinished runs from their newest checkpoint and skips finished ones. A
run folder whose checkpoint was trained with another config than the spec now plans for that run
(a changed learning rate of a held-out run, an edited `overrides` line) is refused before anything
starts: its results would be reported under the spec's values, and continuing it would mix two runs.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from fitscale.checkpoint.layout import complete_steps, step_dirname
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


# Fields that change how a run is reported, launched or fed, never what it computes: a finished or
# partial run may be relaunched with other values (the resume rules of fitscale.train.resume apply).
REPORTING_ONLY = ("log.", "launch.", "hooks.", "data.num_workers")


def check_unchanged(spec: SweepSpec, run: PlannedRun, config, step: int) -> None:
    """UserError when the run folder's newest checkpoint was trained with another config than `config`.

    Compares as a resume does (`fitscale.train.resume.comparable`: the model resolved to its fields,
    where-to-run fields left out) and refuses every change but those in REPORTING_ONLY: a sweep's
    run is defined by its config.
    """
    from fitscale.train.resume import comparable, config_changes, saved_config  # lazy: heavy

    folder = run_dir(spec, run)
    saved = saved_config(folder / "checkpoints" / step_dirname(step), folder)
    if saved is None:
        return
    changes = [
        change
        for change in config_changes(comparable(saved), comparable(config))
        if not change.field.startswith(REPORTING_ONLY)
    ]
    if changes:
        listed = "; ".join(f"{c.field} was {c.old!r}, the spec now gives {c.new!r}" for c in changes[:5])
        more = f" (and {len(changes) - 5} more)" if len(changes) > 5 else ""
        raise UserError(
            f"sweep run {run.name}: {folder} was trained with another config: {listed}{more}. Set the spec "
            f"back, or move {folder} aside (or rename the run) to train it again"
        )


def resolved_configs(spec: SweepSpec, runs: list[PlannedRun]) -> list:
    """The RunConfig of every run (recipe + sweep overrides + the run's own), validated now."""

    configs = []
    for run in runs:
        try:
            configs.append(load_config(spec.recipe, run_overrides(spec, run)))
        except ValueError as error:
            raise UserError(f"sweep run {run.name}: {error}") from None
    if spec.digits_quality and spec.digits_quality.get("ema", True):
        for run, config in zip(runs, configs):
            if not config.optim.ema.enabled:
                raise UserError(
                    f"sweep {spec.name!r}: digits_quality scores the EMA weights, but run {run.name} trains "
                    "with optim.ema.enabled=false; set `ema: false` in digits_quality, or turn the EMA on"
                )
    return configs


def launch_sweep(
    spec: SweepSpec, cluster: str | None = None, local: bool = False, only: list[str] | None = None
) -> dict[str, str]:
    """Launch every run that is not done; returns {run name: job id, `local`, or `done`}.

    `local` trains the runs one after another in this process (single rank; the CPU demo and
    small sweeps), stopping the sweep at an exit signal (`train_locally`); otherwise they go to
    SLURM as one job array (`fitscale.launch.launcher.submit_sweep`).
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
    pending, configs = [], []
    for run, config in zip(runs, resolved_configs(spec, runs)):
        status, step = run_status(spec, run)
        if step is not None:
            check_unchanged(spec, run, config, step)
        if status == "done":
            outcome[run.name] = "done"
        else:
            pending.append(run)
            configs.append(config)
    if not pending:
        return outcome
    Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
    if local:
        return train_locally(spec, pending, configs, outcome)

    job_ids = submit_sweep(configs, spec.out_dir, cluster)
    outcome.update({run.name: job_id for run, job_id in zip(pending, job_ids)})
    return outcome


def train_locally(
    spec: SweepSpec, pending: list[PlannedRun], configs: list, outcome: dict[str, str]
) -> dict[str, str]:
    """Train `pending` one after another in this process; stop the sweep at an exit signal.

    A signal during a run reaches that run's trainer (it saves a checkpoint and stops: `stopped by
    SIGTERM`). One that arrives between runs, or while the next run is being built, is held by the
    sweep's own handler (else Python would raise it wherever the closing run happened to be, e.g.
    in a data-loader generator's close, where it is printed and ignored): the next run is `stopped
    by SIGINT before it started`. Either way the later runs are `not started`."""
    from fitscale.train.trainer import Trainer  # lazy: heavy

    received: list[str] = []
    previous = {
        signum: signal.signal(signum, lambda number, frame: received.append(signal.Signals(number).name))
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        for index, (run, config) in enumerate(zip(pending, configs)):
            stopped = received[0] if received else None
            if stopped is None:
                log.info("sweep %s: training %s for %d steps", spec.name, run.name, run.steps)
                trainer = Trainer(config)
                if received:  # arrived before its trainer took the signals over
                    trainer.close()
                    stopped = received[0]
                else:
                    trainer.train()
                    if trainer.stopped_by is not None:
                        stopped = trainer.stopped_by
                        outcome[run.name] = f"stopped by {stopped}"
                    elif trainer.checkpoints.exit_requested:  # after its last step: the run is finished
                        received.append(trainer.checkpoints.last_signal)
            if stopped is None:
                outcome[run.name] = "local"
                continue
            outcome.setdefault(run.name, f"stopped by {stopped} before it started")
            outcome.update({later.name: "not started" for later in pending[index + 1 :]})
            log.warning(
                "sweep %s: %s stopped %s and %d later runs; launch again to continue",
                spec.name, stopped, run.name, len(pending) - index - 1,
            )  # fmt: skip
            return outcome
        return outcome
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
