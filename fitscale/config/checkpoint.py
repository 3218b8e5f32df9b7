"""The checkpoint section: how often, how many are kept, and how they are written.

Which checkpoint a run resumes from is `train.resume`; this section only shapes saving.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field

from fitscale.config.bounds import bound
from fitscale.config.errors import ConfigError
from fitscale.config.schema import check_choices
from fitscale.runtime.local import INTERRUPTED_STATUS  # noqa: F401  (re-exported: the checkpoint signals' status)


@dataclass
class CheckpointConfig:
    """Sharded DCP checkpoints under `<run_dir>/<folder>/step-N/`, visible only once complete."""

    folder: str = "checkpoints"
    """Sub-folder of the run folder that holds the `step-N` checkpoints."""
    interval: int = field(default=1000, metadata=bound(0, meaning="0 disables it"))
    """Save every this many optimizer steps; 0 saves only on a signal and at the end."""
    save_at_end: bool = True
    """Save when the run reaches `train.steps`."""
    keep_last: int = field(default=3, metadata=bound(0, meaning="0 disables it"))
    """Keep the newest K complete checkpoints; 0 keeps every checkpoint."""
    keep_every: int = field(default=0, metadata=bound(0, meaning="0 disables it"))
    """Also keep every checkpoint whose step is a multiple of M (milestones); 0 keeps none extra."""
    async_save: bool = False
    """Write with `dcp.async_save`: the step loop continues while a background thread writes the
    staged copy; the checkpoint becomes visible at a later step boundary once all ranks finished."""
    save_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"])
    """Signals that request a checkpoint at the next step boundary."""
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGINT"])
    """Of those, the signals after which the run exits once the checkpoint is written. SIGINT (Ctrl-C)
    also exits with status 130, and a second SIGINT stops at once without saving; left out of both
    lists, SIGINT keeps Python's KeyboardInterrupt."""
    signal_check_every: int = field(default=1, metadata=bound(1))
    """Ranks agree on pending signal requests every this many steps (one tiny all-reduce), so a signal
    that reached only some ranks still makes all of them save together."""

    def __post_init__(self) -> None:
        if not self.folder or "/" in self.folder or self.folder in (".", ".."):
            raise ConfigError(
                f"checkpoint.folder: must be a plain folder name such as `checkpoints`, got {self.folder!r}"
            )
        check_choices(self, "checkpoint.")
        for name in ("save_signals", "exit_signals"):
            for signame in getattr(self, name):
                if not signame.startswith("SIG") or not hasattr(signal, signame):
                    raise ConfigError(f"checkpoint.{name}: {signame!r} is not a signal name such as SIGUSR1")
        extra = sorted(set(self.exit_signals) - set(self.save_signals))
        if extra:
            raise ConfigError(
                f"checkpoint.exit_signals: {', '.join(extra)} must also be in checkpoint.save_signals "
                "(the run saves before it exits)"
            )
