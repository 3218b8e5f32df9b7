"""What a SLURM task runs: one rank of a run, and the glue that brings a preempted run back.

submitit starts every task of the job with `srun` and calls `TrainingJob()` in each. A job ends
in one of three ways:
- The run reaches `train.steps`: the result is returned (submitit pickles it for `fitscale launch`).
- SIGUSR2, which SLURM sends `launch.signal_delay_s` before the time limit (`--signal`): the
  trainer saves a checkpoint at the next step boundary and stops; rank 0 then hands over to
  submitit's own handler, which calls `TrainingJob.checkpoint` (the same job: it resumes from the
  newest complete checkpoint), rewrites the job's pickle and runs `scontrol requeue`. submitit
  counts these requeues and ends the run with "timed-out too many times" after
  `launch.max_timeout_requeues`.
- SIGTERM (preemption, `scontrol requeue`, `scancel`, or the limit itself when SIGUSR2 came too
  late): the trainer saves and stops, and the task exits without a result. SLURM requeues a
  preempted or requeued job by itself; a cancelled one stays cancelled.
The checkpoint manager installs its handlers over submitit's while the trainer runs and restores
them when it closes, which is why submitit's SIGUSR2 handler is available again afterwards.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from typing import Any

from fitscale.clitools import USER_ERRORS
from fitscale.config import load_config
from fitscale.runtime.env import export_torch_env, slurm_rank_info
from fitscale.runtime.failures import record_failure, slurm_error_folder
from fitscale.runtime.rundir import slurm_folder

log = logging.getLogger("fitscale.launch")

TIME_LIMIT_SIGNAL = "SIGUSR2"  # submitit's preemption/timeout signal (its `--signal=USR2@delay`)
PREEMPT_SIGNAL = "SIGTERM"


def make_signals_exit(config) -> None:
    """Make the trainer stop (not just save) on the time-limit signal, so the job can requeue in time."""
    ckpt = config.checkpoint
    for name in (TIME_LIMIT_SIGNAL, PREEMPT_SIGNAL):
        if name not in ckpt.save_signals:
            ckpt.save_signals = [*ckpt.save_signals, name]
        if name not in ckpt.exit_signals:
            ckpt.exit_signals = [*ckpt.exit_signals, name]


class TrainingJob:
    """One run as a submitit callable; pickled once at submission with the resolved config.

    The config is kept as YAML text, so edits to the recipe after submission never change a queued
    or requeued run.
    """

    def __init__(self, config_yaml: str, run_dir: str):
        self.config_yaml = config_yaml
        self.run_dir = run_dir

    def __repr__(self) -> str:
        return f"TrainingJob(run_dir={self.run_dir!r})"

    def load_config(self):
        """The run config parsed from the resolved YAML the job carries (ConfigError when it does not
        load).
        """

        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
            handle.write(self.config_yaml)
        try:
            return load_config(handle.name)
        finally:
            os.unlink(handle.name)

    def __call__(self) -> dict[str, Any]:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
        # submitit's requeue handler, called by hand once the trainer has saved (see the module docstring).
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        early = _EarlySignals()  # signals that arrive while torch loads and the model builds
        if "SLURM_STEP_ID" in os.environ:
            export_torch_env(slurm_rank_info(os.environ))
        log.info(
            "rank %s of %s, job %s, restart %s",
            os.environ.get("RANK"),
            os.environ.get("WORLD_SIZE"),
            os.environ.get("SLURM_JOB_ID"),
            os.environ.get("SLURM_RESTART_COUNT", "0"),
        )
        try:
            config = self.load_config()
            from fitscale.train.trainer import Trainer  # lazy: heavy

            trainer = Trainer(config)  # its checkpoint manager now owns SIGTERM/SIGUSR2
            early.watch_time_limit()
            early.replay()
            step = trainer.train()
        except Exception as error:
            self._report_failure(error)
            raise
        early.restore()  # the trainer handed the signals back to our recorders; give them back to submitit
        if step >= config.train.steps:
            return {"run_dir": self.run_dir, "step": step, "job_id": os.environ.get("SLURM_JOB_ID")}
        # A time-limit warning wins over a later SIGTERM (the limit itself, or a preemption that sends
        # both): the run has its checkpoint, so it requeues, within the requeue limit.
        last = TIME_LIMIT_SIGNAL if early.time_limit_warned else trainer.checkpoints.last_signal
        self._after_interrupt(last, step, submitit_handler)
        raise AssertionError("unreachable")  # _after_interrupt always exits

    def _report_failure(self, error: Exception) -> None:
        """This rank's one-line report, so `fitscale launch --wait` and `fitscale status` name the
        first rank that failed (the others often fail after it, having lost their peer)."""

        try:
            import submitit

            environment = submitit.JobEnvironment()
            folder, job_id = environment.paths.folder, environment.job_id
        except Exception:  # not started by submitit
            folder, job_id = slurm_folder(self.run_dir), os.environ.get("SLURM_JOB_ID", "local")
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        try:
            record_failure(error, isinstance(error, USER_ERRORS), slurm_error_folder(folder, job_id, restart))
        except OSError as write_error:  # the job's own error still goes to submitit
            log.warning("could not write the failure report: %s", write_error)

    def _after_interrupt(self, last_signal: str | None, step: int, submitit_handler: Any) -> None:
        """The trainer stopped early with a complete checkpoint at `step`: requeue or just exit."""
        log.info("rank %s stopped at step %d on %s", os.environ.get("RANK", "0"), step, last_signal)
        if last_signal == TIME_LIMIT_SIGNAL:
            handler = submitit_handler
            if callable(handler):
                # submitit's checkpoint_and_try_requeue: rank 0 requeues and exits, other ranks return.
                handler(signal.SIGUSR2, None)
            else:
                log.warning("no submitit handler for SIGUSR2 (not started by submitit?); not requeuing")
        # Preempted, requeued by SLURM, cancelled, or a non-zero rank: leave without a result, exit 0 so
        # that srun's --kill-on-bad-exit does not cut short a rank that is still requeuing the job.
        sys.stdout.flush()
        raise SystemExit(0)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's requeue hook: run the same job again; it resumes from the newest complete checkpoint
        (also when the job was started with `train.resume=S`: fitscale.train.resume.resume_on_restart)."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainingJob(self.config_yaml, self.run_dir))


class _EarlySignals:
    """Hold SIGTERM/SIGUSR2 that arrive before the trainer handles signals, and hand them to it after.

    SLURM's warning comes up to ~30 s earlier than `--signal` asks (its controller checks time
    limits every 30 s), so on short jobs it can land while torch is still loading. Replayed once
    the checkpoint manager listens, it still yields a checkpoint and a requeue instead of a lost
    signal or a requeue with no progress.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

    def __init__(self) -> None:
        self.pending: list[int] = []
        self.time_limit_warned = False
        self.previous = {signum: signal.signal(signum, self._record) for signum in self.SIGNALS}

    def _record(self, signum: int, _frame: Any) -> None:
        log.info("%s during start-up; handing it to the trainer once it runs", signal.Signals(signum).name)
        self.time_limit_warned |= signum == signal.SIGUSR2
        self.pending.append(signum)

    def watch_time_limit(self) -> None:
        """Also note SIGUSR2 while the trainer's handler owns it (the trainer only keeps the last signal)."""
        trainer_handler = signal.getsignal(signal.SIGUSR2)

        def note_and_forward(signum: int, frame: Any) -> None:
            self.time_limit_warned = True
            if callable(trainer_handler):
                trainer_handler(signum, frame)

        if callable(trainer_handler):
            signal.signal(signal.SIGUSR2, note_and_forward)

    def replay(self) -> None:
        for signum in dict.fromkeys(self.pending):
            signal.raise_signal(signum)
        self.pending.clear()

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
