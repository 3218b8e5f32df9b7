"""Learning-rate schedules as a factor of the base rate: warmup then constant, cosine, warmup-stable-decay.

The scheduler is a `LambdaLR` over a `functools.partial` of a pure function. LambdaLR saves a
callable object's attributes in its state dict and restores them on load; a partial has none,
so a resumed run takes the schedule from its (possibly edited) config, such as a longer
`train.steps`, while the step counter comes from the checkpoint. The base rates it saves would
still win over an edited `optim.lr`; `rebase_lr_scheduler` puts the config's back after a load.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from fitscale.compat import set_last_lr
from fitscale.config.optim import ScheduleConfig
from fitscale.errors import UserError


def warmup_factor(step: int, warmup_steps: int) -> float:
    """(step + 1) / warmup_steps during warmup, so the first step already moves the weights."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return (step + 1) / warmup_steps


def _decay(progress: float, shape: str) -> float:
    """1 -> 0 as progress goes 0 -> 1."""
    progress = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "sqrt":
        return 1.0 - math.sqrt(progress)
    return 1.0 - progress


def lr_factor(step: int, cfg: ScheduleConfig, total_steps: int) -> float:
    """Multiplier of the base learning rate at 0-based optimizer step `step`."""
    warmup = warmup_factor(step, cfg.warmup_steps)
    if cfg.name == "constant" or step < cfg.warmup_steps:
        return warmup
    floor = cfg.min_lr_ratio
    if cfg.name == "cosine":
        span = max(total_steps - cfg.warmup_steps - 1, 1)
        return floor + (1.0 - floor) * _decay((step - cfg.warmup_steps) / span, "cosine")
    decay_steps = max(int(round(cfg.decay_fraction * total_steps)), 1)
    decay_start = max(total_steps - decay_steps, cfg.warmup_steps)
    if step < decay_start:
        return 1.0
    span = max(total_steps - decay_start - 1, 1)
    return floor + (1.0 - floor) * _decay((step - decay_start) / span, cfg.decay_shape)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int) -> LambdaLR:
    """A Stateful scheduler; call `.step()` once after every optimizer step."""
    if total_steps < 1:
        raise UserError(f"train.steps must be >= 1 to build a learning-rate schedule, got {total_steps}")
    if cfg.warmup_steps >= total_steps and cfg.name != "constant":
        raise UserError(
            f"optim.schedule.warmup_steps={cfg.warmup_steps} leaves no steps to decay in a run of {total_steps}; "
            "lower optim.schedule.warmup_steps or raise train.steps"
        )
    return LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg, total_steps=total_steps))


def rebase_lr_scheduler(scheduler: LambdaLR, base_lr: float) -> None:
    """Make `base_lr` every group's base rate from the scheduler's current step on (after a load).

    A loaded LambdaLR (and optimizer) keep the base rates they were saved with; a resumed run's rate
    is the config's. The current rate becomes `base_lr * factor(step)`, the value LambdaLR's own
    `get_lr` gives, so an unchanged rate stays bit-identical.
    """
    scheduler.base_lrs = [base_lr] * len(scheduler.optimizer.param_groups)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * factor(scheduler.last_epoch)
    set_last_lr(scheduler, [group["lr"] for group in scheduler.optimizer.param_groups])
