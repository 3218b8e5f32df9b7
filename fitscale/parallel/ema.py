"""EMA of the weights: an fp32 shadow of every parameter, sharded exactly like the parameter.

With FSDP2 each parameter is a DTensor holding this rank's shard; the shadow is a DTensor with
the same placement, so the EMA costs 4 bytes per parameter divided by the shard count, updates
without communication (one fused lerp over local shards), and saves/loads through DCP with the
same resharding as the weights. Names are the parameters' names with wrapper segments removed,
so they match the model's checkpoint keys and `fitscale convert export --ema`.

The decay of each update is `ema_decay(cfg, step)`, a function of the optimizer step alone, so
a resumed run (whose step comes back from the checkpoint) averages exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from fitscale.compat import foreach_copy_, foreach_lerp_
from fitscale.config.optim import EMAConfig
from fitscale.errors import UserError
from fitscale.models.official import clean_parameter_name
from fitscale.parallel.float8 import without_float8_wrapper  # plain copies of float8 weights


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def ema_decay(cfg: EMAConfig, step: int) -> float:
    """Decay per optimizer step of the update after optimizer step `step` (1-based); 0 means copy.

    With t = step - cfg.start_step - 1, as diffusers' `EMAModel.get_decay` (its `optimization_step`
    is our step, its `update_after_step` our `start_step`): 0 while t <= 0, else
    min(cfg.decay, 1 - (1 + t / inv_gamma) ** -power) for `power` warmup and
    min(cfg.decay, (1 + t) / (10 + t)) for `ratio`. `none` keeps the constant `cfg.decay` after
    `start_step` (copying up to it), as the FiTv2 release's `update_ema` (train_fitv2.py).
    """
    if cfg.warmup == "none":
        return 0.0 if step <= cfg.start_step else cfg.decay
    t = step - cfg.start_step - 1
    if t <= 0:
        return 0.0
    if cfg.warmup == "power":
        value = 1.0 - (1.0 + t / cfg.inv_gamma) ** -cfg.power
    else:
        value = (1.0 + t) / (10.0 + t)
    return min(value, cfg.decay)


def ema_initial_weight(cfg: EMAConfig, step: int) -> float:
    """The weight the average after optimizer step `step` still gives the initial weights, in [0, 1].

    The product of the decays of its updates (decay ** update_every each), 0 once an update copied
    the weights. A warmed-up EMA copies at its first update, so this is 0; a constant decay d after
    s steps leaves d ** s (0.99 after 24 steps: 0.79), which makes the EMA of short runs score
    mostly their initialisation.
    """
    weight, k = 1.0, cfg.update_every
    for update_step in range(k, step + 1, k):
        decay = ema_decay(cfg, update_step)
        if decay == 0.0:
            return 0.0
        if decay == cfg.decay:  # the cap: every later update uses it too (the warmup only grows)
            return weight * cfg.decay ** (k * ((step - update_step) // k + 1))
        weight *= decay**k
    return weight


class EMA:
    """Exponential moving average of `model`'s parameters (a `Stateful` for the CheckpointManager).

    Call `update(step)` after every optimizer step; it averages on steps that are multiples of
    `cfg.update_every` with decay `ema_decay(cfg, step) ** cfg.update_every`, and copies the weights
    where that decay is 0 (before `cfg.start_step`, and at the first step of a warmup). Frozen parameters are tracked too (they stay equal to the weights), so the
    EMA is always a complete set of weights for evaluation and export.
    """

    def __init__(self, model: nn.Module, cfg: EMAConfig):
        self._track({clean_parameter_name(name): param for name, param in model.named_parameters()}, cfg)

    @classmethod
    def of_tensors(cls, tensors: dict[str, torch.Tensor], cfg: EMAConfig) -> EMA:
        """The average of live tensors that are not a module's parameters (e.g. the fp32 master
        partitions of DeepSpeed ZeRO, fitscale.parallel.deepspeed_ema): same update rule.
        `copy_to` and `swap_into` need a model and are not used for these."""
        ema = cls.__new__(cls)
        ema._track(tensors, cfg)
        return ema

    @torch.no_grad()
    def _track(self, params: dict[str, torch.Tensor], cfg: EMAConfig) -> None:
        self.cfg = cfg
        self.num_updates = 0
        self._params = dict(params)

        self.shadow = {
            name: without_float8_wrapper(param.detach()).to(torch.float32, copy=True)
            for name, param in params.items()
        }

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the current weights into the average after optimizer step `step` (1-based)."""
        if step % self.cfg.update_every:
            return
        shadows = [_local(s) for s in self.shadow.values()]
        params = [_local(p).float() for p in self._params.values()]
        decay = ema_decay(self.cfg, step)
        if decay == 0.0:
            foreach_copy_(shadows, params)
        else:
            foreach_lerp_(shadows, params, 1.0 - decay**self.cfg.update_every)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite `model`'s weights with the average (cast to each parameter's dtype)."""
        for name, param in model.named_parameters():
            _local(param).copy_(_local(self.shadow[clean_parameter_name(name)]))

    @contextlib.contextmanager
    def swap_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Run `model` with the averaged weights inside the block, restoring its own weights after."""
        with torch.no_grad():
            backup = {name: _local(p).clone() for name, p in model.named_parameters()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in model.named_parameters():
                    _local(param).copy_(backup[name])

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Set the average to full (unsharded) weights keyed by parameter name, e.g. another run's
        EMA (`train.init_from`); each rank keeps its own shard, without communication. Raises
        ValueError naming parameters that `full` lacks."""
        missing = sorted(set(self.shadow) - set(full))
        if missing:
            raise UserError(f"the EMA to start from lacks {', '.join(missing[:5])}")
        for name, shadow in self.shadow.items():
            value = full[name].to(torch.float32)
            if isinstance(shadow, DTensor):
                value = distribute_tensor(value, shadow.device_mesh, shadow.placements, src_data_rank=None)
            _local(shadow).copy_(_local(value))

    def state_dict(self) -> dict[str, Any]:
        """The fp32 shadows themselves (DCP loads into them in place, resharding DTensors) and the
        update count.
        """
        # The shadows themselves: DCP loads into them in place (resharding DTensors as needed).
        return {"params": dict(self.shadow), "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Copy saved shadows into this EMA; ValueError naming missing or unexpected parameter names."""
        params = state_dict["params"]
        missing = sorted(set(self.shadow) - set(params))
        unexpected = sorted(set(params) - set(self.shadow))
        if missing or unexpected:
            raise UserError(
                f"EMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, shadow in self.shadow.items():
            if params[name] is not shadow:
                shadow.copy_(params[name])
        self.num_updates = int(state_dict["num_updates"])
