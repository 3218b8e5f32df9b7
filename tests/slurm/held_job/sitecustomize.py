"""Hold a test's SLURM training job until SLURM has signalled it.

The SLURM tests put this folder first on the PYTHONPATH of a job whose outcome needs a signal to
arrive mid-run (the time-limit warning), with `FITSCALE_TEST_HOLD_AT_STEP=k`. Python imports this
module at start-up in every process of the job; in the tasks of the job's first attempt
(`SLURM_RESTART_COUNT` unset or 0) it wraps `Trainer.train_step` once `fitscale.train.trainer` is
imported: each rank takes k steps, then waits before its next step until its trainer has been asked
to save by a signal. So the first attempt cannot end before SLURM's warning, however fast the
machine: the job waits for the event, not for an amount of time. Requeued attempts run unheld.

Nothing is imported eagerly: SLURM's warning may come while Python starts, and the task's own
handlers must be in place first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

HOLD_AT_STEP = os.environ.get("FITSCALE_TEST_HOLD_AT_STEP")
TRAINER_MODULE = "fitscale.train.trainer"


def hold_until_signalled(train_step, hold_at_step: int):
    released = False

    def held_train_step(self, step_batch):
        nonlocal released
        if not released and self.progress.step >= hold_at_step:
            sys.stderr.write(f"held at step {self.progress.step} until a signal asks for a checkpoint\n")
            while not self.checkpoints.save_requested:
                time.sleep(0.05)  # signal handlers run between these sleeps
            released = True
        return train_step(self, step_batch)

    return held_train_step


class PatchTrainerOnImport(importlib.abc.MetaPathFinder):
    """Finds the trainer module through the other finders and wraps its step once it has run."""

    def find_spec(self, name, path=None, target=None):
        if name != TRAINER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_and_hold(module) -> None:
            run_module(module)
            trainer = module.Trainer
            trainer.train_step = hold_until_signalled(trainer.train_step, int(HOLD_AT_STEP))

        spec.loader.exec_module = exec_and_hold
        return spec


if HOLD_AT_STEP and "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    sys.meta_path.insert(0, PatchTrainerOnImport())
