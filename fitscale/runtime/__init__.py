"""The process: where a rank sits in the job, local ranks, failure reports, the run folder, rank agreement.

The bottom layer of fitscale (docs/architecture.md): it imports nothing of fitscale but the
ground-floor modules, and every package above may use it.

- `fitscale.runtime.env`: the rank record (`DistributedEnv`) and joining the job's process group.
- `fitscale.runtime.local.launch_local(argv, nproc, ...)`: N ranks here; one node of a job without SLURM.
- `fitscale.runtime.failures`: the first failing rank's error, reported once.
- `fitscale.runtime.rundir`: the run-folder layout.
- `fitscale.runtime.agree`: file reads that decide a collective, made the same on every rank.
"""
