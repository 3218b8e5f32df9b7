"""Watching runs from their folders: `fitscale report` (plots and a summary of one or more runs)
and `fitscale status` (where a run stands). Reads metrics.jsonl, checkpoints and the run lock;
imports no torch.

Nothing is imported here, so `fitscale --help` stays fast: import from the submodules.
"""
