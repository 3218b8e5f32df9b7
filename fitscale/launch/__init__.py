"""Launching runs: SLURM via submitit (with preemption and requeue), local and multi-node ranks.

- `fitscale.launch.env.init_distributed_from_env()`: join the job's process group however it started.
- `fitscale.launch.local.launch_local(argv, nproc, ...)`: N ranks here; one node of a job without SLURM.
- `fitscale.launch.launcher.plan_launch / submit_plan / submit_sweep`: what `fitscale launch` and
  `fitscale sweep launch` call.
- `fitscale.launch.rundir`: the run-folder layout.
"""
