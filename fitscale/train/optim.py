"""AdamW for the trainable parameters, with weight-decay groups and batch-size learning-rate scaling.

torch's fused AdamW kernels exist for CUDA and CPU (and take FSDP2 DTensor parameters), so
`implementation: auto` uses them wherever the parameters live on such a device and falls back
to the multi-tensor `foreach` path elsewhere. NVIDIA apex's FusedAdam is used only when asked for
and when a real apex build is importable: the `apex` package on PyPI is an unrelated project, so
the check looks for `apex.optimizers.FusedAdam` itself.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from fitscale.compat import fused_optimizer_device_types
from fitscale.config.optim import OptimConfig
from fitscale.errors import UserError
from fitscale.models.official import clean_parameter_name


def scaled_lr(cfg: OptimConfig, global_batch_size: int | None) -> float:
    """`cfg.lr` scaled from `cfg.base_batch_size` to the run's global batch (images per step)."""
    if cfg.lr_scaling == "none":
        return cfg.lr
    if global_batch_size is None or global_batch_size < 1:
        raise UserError(
            f"optim.lr_scaling={cfg.lr_scaling!r} needs the global batch size (images per optimizer step), "
            f"got {global_batch_size}; pass global_batch_size or set optim.lr_scaling=none"
        )
    ratio = global_batch_size / cfg.base_batch_size
    return cfg.lr * (ratio if cfg.lr_scaling == "linear" else math.sqrt(ratio))


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Trainable parameters split into decayed (matrices) and not decayed (1-D, `no_weight_decay`)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        clean = clean_parameter_name(name)
        exempt = param.ndim < 2 or any(fnmatch.fnmatchcase(clean, p) for p in cfg.no_weight_decay)
        (no_decay if exempt else decay).append(param)
    if not decay and not no_decay:
        raise UserError(
            "the model has no trainable parameters: check train.trainable (every pattern matched nothing?)"
        )
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": cfg.weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def apex_fused_adam():
    """NVIDIA apex's FusedAdam class, or None when no real apex build is importable."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        return None
    return FusedAdam


def _device_types(groups: list[dict]) -> set[str]:
    return {p.device.type for group in groups for p in group["params"]}


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, global_batch_size: int | None = None
) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters; build it after `apply_fsdp` (it holds the shards)."""
    groups = parameter_groups(model, cfg)
    lr = scaled_lr(cfg, global_batch_size)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.implementation == "apex":
        fused_adam = apex_fused_adam()
        if fused_adam is None:
            raise ImportError(
                "optim.implementation=apex needs NVIDIA apex built with its CUDA extensions "
                "(https://github.com/NVIDIA/apex; `pip install apex` installs an unrelated package); "
                "or set optim.implementation=auto"
            )
        return fused_adam(groups, lr=lr, betas=betas, eps=cfg.eps, adam_w_mode=True)
    devices = _device_types(groups)
    fused_ok = devices <= fused_optimizer_device_types()
    if cfg.implementation == "fused" and not fused_ok:
        raise UserError(
            f"optim.implementation=fused: torch has no fused AdamW for device {sorted(devices)}; "
            "set optim.implementation=auto or foreach"
        )
    use_fused = cfg.implementation == "fused" or (cfg.implementation == "auto" and fused_ok)
    return torch.optim.AdamW(
        groups,
        lr=lr,
        betas=betas,
        eps=cfg.eps,
        fused=True if use_fused else None,
        foreach=None if use_fused else True,
    )
