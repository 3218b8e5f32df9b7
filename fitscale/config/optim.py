"""The optimisation section: AdamW, its learning-rate schedule and the EMA of the weights.

`optim.schedule` and `optim.ema` are nested here because all three describe one thing, how
the weights move; `build_optimizer`, `build_lr_scheduler` and `EMA` in fitscale.train read them.
Defaults are the FiTv2 recipe: AdamW at 1e-4 with no weight decay for a batch of 256, a constant
rate after warmup, EMA decay 0.9999. The EMA of a new run warms up (`optim.ema.warmup: power`);
the paper recipes set `warmup: none`, the release's constant decay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fitscale.config.bounds import bound
from fitscale.config.schema import check_choices


@dataclass
class ScheduleConfig:
    """Learning-rate factor over steps: linear warmup, then constant, cosine or warmup-stable-decay."""

    name: Literal["constant", "cosine", "wsd"] = "constant"
    """`constant` (the paper: warmup then the base rate), `cosine` (to `min_lr_ratio` at the last step)
    or `wsd` (warmup, stable, then decay over the last `decay_fraction` of the run)."""
    warmup_steps: int = field(default=0, metadata=bound(0, meaning="0 disables warmup"))
    """Steps of linear warmup; step i runs at (i + 1) / warmup_steps of the base rate."""
    min_lr_ratio: float = field(default=0.0, metadata=bound(0, 1))
    """Final rate as a fraction of the base rate for `cosine` and `wsd`."""
    decay_fraction: float = field(
        default=0.2, metadata=bound(0, 1, low_open=True, note="0.2 decays over the last fifth of the run")
    )
    """`wsd`: fraction of all steps spent decaying at the end of the run."""
    decay_shape: Literal["linear", "cosine", "sqrt"] = "linear"
    """`wsd`: shape of the decay, `linear`, `cosine` or `sqrt` (1 - sqrt of progress)."""

    def __post_init__(self) -> None:
        check_choices(self, "optim.schedule.")


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, kept in fp32 and sharded like the parameters."""

    enabled: bool = True
    """Keep an EMA (saved in every checkpoint, exported with `fitscale convert export --ema`)."""
    decay: float = field(default=0.9999, metadata=bound(0, 1, high_open=True, note="the paper uses 0.9999"))
    """Decay per optimizer step; with `update_every: k` each update uses decay**k, so the averaging
    horizon in steps does not depend on the interval."""
    update_every: int = field(default=1, metadata=bound(1))
    """Update the EMA every k optimizer steps (a cost knob for very large models)."""
    start_step: int = field(default=0, metadata=bound(0))
    """Before this step the EMA copies the weights instead of averaging them."""
    warmup: Literal["none", "ratio", "power"] = field(
        default="power", metadata={"hint": "`power` for new runs, `none` for the release's constant decay"}
    )
    """How the decay grows with the step t = step - start_step - 1 (diffusers' `EMAModel.get_decay`;
    the EMA copies the weights while t <= 0, and the decay never exceeds `decay`):
    `power`: 1 - (1 + t / inv_gamma) ** -power (diffusers `use_ema_warmup=True`, timm `ModelEmaV3`);
    `ratio`: (1 + t) / (10 + t) (diffusers' default, TensorFlow's `ExponentialMovingAverage(num_updates)`);
    `none`: `decay` from the first step (the FiTv2 release, whose EMA starts at the initial weights).
    Without warmup the EMA of a run shorter than a few 1 / (1 - decay) steps is mostly its initial weights."""
    inv_gamma: float = field(default=1.0, metadata=bound(0, low_open=True, note="diffusers uses 1.0"))
    """`power` warmup: steps are divided by this before the power (larger: slower warmup)."""
    power: float = field(default=2 / 3, metadata=bound(0, low_open=True, note="diffusers uses 2/3"))
    """`power` warmup: the exponent; 2/3 reaches decay 0.999 at 31.6k steps and 0.9999 at 1M steps,
    3/4 reaches 0.999 at 10k steps (for shorter runs)."""

    def __post_init__(self) -> None:
        check_choices(self, "optim.ema.")


@dataclass
class OptimConfig:
    """AdamW and how its learning rate is set."""

    lr: float = field(default=1e-4, metadata=bound(0, low_open=True, note="the paper uses 1e-4"))
    """Base learning rate, for a global batch of `base_batch_size` images when `lr_scaling` is on."""
    beta1: float = field(default=0.9, metadata=bound(0, 1, high_open=True))
    """AdamW first-moment decay."""
    beta2: float = field(default=0.999, metadata=bound(0, 1, high_open=True))
    """AdamW second-moment decay."""
    eps: float = field(default=1e-8, metadata=bound(0, low_open=True))
    """AdamW denominator epsilon."""
    weight_decay: float = field(default=0.0, metadata=bound(0))
    """Decoupled weight decay of the matrices; 1-D parameters and `no_weight_decay` matches get none."""
    no_weight_decay: list[str] = field(default_factory=lambda: ["*.bias", "*embedding_table*"])
    """fnmatch patterns of parameter names that never get weight decay."""
    implementation: Literal["auto", "fused", "foreach", "apex"] = "auto"
    """`auto` (torch fused kernels where the device has them, else foreach), `fused`, `foreach`, or
    `apex` (NVIDIA apex FusedAdam; needs a real apex build, which PyPI does not have)."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale the rate with the global batch: `linear` (lr * B / base_batch_size), `sqrt`, or `none`."""
    base_batch_size: int = field(default=256, metadata=bound(1))
    """Global batch (images per optimizer step) that `lr` was tuned for."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)

    def __post_init__(self) -> None:
        check_choices(self, "optim.")
