"""Launching runs: SLURM via submitit (with preemption and requeue), above the trainer.

- `fitscale.launch.launcher.plan_launch / submit_plan / submit_sweep`: what `fitscale launch` and
  `fitscale sweep launch` call.
- `fitscale.launch.slurm`: submitit executors, job states, `active_job` of a run folder.
- `fitscale.launch.job.TrainingJob`: what each SLURM task runs (preemption, requeue, resume).

The process pieces these build on (rank environment, local ranks, failure reports, the run folder)
live in `fitscale.runtime`.
"""
