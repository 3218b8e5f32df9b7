"""The logging section: JSONL metrics, wandb, the progress bar and the MFU peak."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fitscale.config.bounds import bound
from fitscale.config.schema import check_choices

OnOff = Literal["auto", "on", "off"]


@dataclass
class LogConfig:
    """What a run reports and where; everything is written by rank 0 unless `all_ranks` is set."""

    every: int = field(default=10, metadata=bound(1))
    """Log metrics every this many optimizer steps."""
    jsonl: bool = True
    """Append one JSON line per logged step to `<run_dir>/metrics.jsonl` (kept across resumes)."""
    all_ranks: bool = False
    """Every other rank writes its own `metrics.rank<r>.jsonl` beside rank 0's `metrics.jsonl` (for debugging
    imbalance); wandb stays on rank 0."""
    progress_bar: OnOff = "auto"
    """tqdm bar with ETA on rank 0: `auto` (only on a terminal), `on` or `off`."""
    console: OnOff = "auto"
    """One `key=value` log line on stderr every `every` steps (step, loss, grad norm, lr, images/s,
    tokens/s, MFU, peak memory, data wait, ETA) and one per event (checkpoint, resume, validation,
    skipped step, samples): `auto` (when no progress bar is shown, e.g. under SLURM), `on` or `off`."""
    wandb: Literal["offline", "online", "disabled"] = "offline"
    """`offline` (files under the run folder, sync later with `wandb sync`), `online` or `disabled`."""
    wandb_project: str = "fitscale"
    """wandb project name."""
    wandb_entity: str | None = None
    """wandb entity (team or user); None uses wandb's default."""
    wandb_name: str | None = None
    """wandb run name; None uses the run folder's name."""
    wandb_tags: list[str] = field(default_factory=list)
    """wandb tags."""
    peak_flops: float = field(default=0.0, metadata=bound(0, meaning="0 uses the device table"))
    """Peak dense bf16 FLOP/s of one device for MFU; 0 looks the device up in the built-in table."""
    timestep_buckets: int = field(default=4, metadata=bound(0, meaning="0 disables it"))
    """Also log the loss averaged over this many equal-width timestep buckets; 0 disables it."""

    def __post_init__(self) -> None:
        check_choices(self, "log.")
