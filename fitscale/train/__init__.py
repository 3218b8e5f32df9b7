"""Training: the Trainer's loop, optimizer and schedule, metrics and log lines, resume rules, and the
checks made before any rank starts (`preflight`). Submodules are imported where they are used, so
importing the package imports nothing (and no torch)."""
