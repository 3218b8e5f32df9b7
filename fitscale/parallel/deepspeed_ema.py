"""EMA of the weights under DeepSpeed ZeRO-2/3, partitioned like ZeRO's own fp32 master copy.

ZeRO keeps the fp32 master weights as one flat tensor per parameter group, cut into one
partition per rank; the optimizer steps on this rank's partition and DeepSpeed then copies it
into the weights the model computes with. The EMA here shadows exactly this rank's partition:
for every trainable parameter, the fragment of it that lies in this rank's partition (a view
into the flat master), so an update is one fused lerp over local tensors with no communication,
and memory is 4 bytes per parameter divided by the rank count, as with FSDP2's sharded EMA. The
update rule is fitscale.parallel.ema.EMA's, applied to these views (`EMA.of_tensors`).

Each fragment is recorded with its place in the full parameter (offset into the flattened
parameter, element count, full shape), so the per-rank files a checkpoint holds
(`ema-rank-R.pt` in the step's DeepSpeed folder, fitscale.checkpoint.deepspeed) assemble offline into full weights for
`fitscale convert export --ema`. Validation and sample grids use the average through
`swap_into`: this rank's master fragments are set to the average and pushed into the weights
(ZeRO's own hp -> lp copy, an all-gather for ZeRO-2), then restored exactly the same way.

Frozen parameters (`train.trainable`) have no master copy and never change, so they are not
averaged: the EMA export takes them from the weights of the same step.

DeepSpeed's public accessor covers ZeRO-3 only (`deepspeed.utils.safe_get_local_fp32_param`);
for ZeRO-2 the per-parameter fragment (`param._hp_mapping`, the same mapping that backs
DeepSpeed's public `safe_get_full_fp32_param`) and the hp -> lp copies are private. Every use
of DeepSpeed's internals is in `ZeroMasterFragments`, checked with DeepSpeed 0.19.8;
tests/integration/test_train_deepspeed.py fails if they change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from fitscale.compat import CHECKED_VERSIONS
from fitscale.config.optim import EMAConfig
from fitscale.errors import UserError
from fitscale.models.official import clean_parameter_name
from fitscale.parallel.ema import EMA

CHECKED_VERSION = CHECKED_VERSIONS["deepspeed"]  # the version the layout below was checked with


@dataclass(frozen=True)
class Fragment:
    """Where this rank's piece of a parameter sits in the flattened parameter."""

    start: int  # first element, in the flattened full parameter
    numel: int  # elements of the parameter in this piece (ZeRO-3 pads the last rank's partition)
    shape: tuple[int, ...]  # the full parameter's shape


class ZeroMasterFragments:
    """This rank's fp32 master fragment of every trainable parameter of a ZeRO-2/3 engine, as live
    views, and the copy of the master into the weights the model computes with."""

    def __init__(self, engine, model: torch.nn.Module):
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        if self.stage not in (2, 3):
            raise ValueError(f"the DeepSpeed EMA needs ZeRO stage 2 or 3, got {self.stage}")
        self.model = model
        self.places: dict[str, Fragment] = {}
        self.views = self.resolve()

    def resolve(self) -> dict[str, torch.Tensor]:
        """The views, looked up again (after a load, DeepSpeed may have relinked its fragments)."""
        rank = self.engine.global_rank
        views: dict[str, torch.Tensor] = {}
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            shape = tuple(getattr(param, "ds_shape", param.shape))
            total = int(torch.Size(shape).numel())
            if self.stage == 3:
                from deepspeed.utils import safe_get_local_fp32_param

                view = safe_get_local_fp32_param(param)
                size = int(param.ds_tensor.ds_numel)
                start = rank * size
                numel = max(0, min(size, total - start))
            else:
                mapping = param._hp_mapping  # None when no element of `param` lies on this rank
                if mapping is None:
                    view, start, numel = torch.empty(0, dtype=torch.float32, device=param.device), 0, 0
                else:
                    view = mapping.hp_fragment
                    start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            if view is None or view.dtype != torch.float32 or view.dim() != 1:
                raise RuntimeError(
                    f"DeepSpeed's fp32 master fragment of {name} is not a flat fp32 view "
                    f"(layout checked with DeepSpeed {CHECKED_VERSION})"
                )
            clean = clean_parameter_name(name)
            views[clean] = view
            self.places[clean] = Fragment(start, numel, shape)
        return views

    @torch.no_grad()
    def push_to_weights(self) -> None:
        """Copy the fp32 master into the weights the model computes with (collective for ZeRO-2)."""
        optimizer = self.engine.optimizer
        if self.stage == 3:
            # As DeepSpeed does around a checkpoint load: release gathered parameters, copy the master
            # into each partition, then gather again the small "persistent" parameters ZeRO-3 keeps whole.
            optimizer.checkpoint_event_prologue()
            for group in range(len(optimizer.fp16_groups)):
                optimizer._reassign_or_swap_out_partitioned_parameters(group)
            optimizer.checkpoint_event_epilogue()
        else:
            optimizer.update_lp_params()


class DeepSpeedEMA:
    """`fitscale.parallel.ema.EMA`'s interface (update, swap_into, state) over ZeRO's fp32 partitions."""

    def __init__(self, engine, model: torch.nn.Module, cfg: EMAConfig):
        self.fragments = ZeroMasterFragments(engine, model)
        self.average = EMA.of_tensors(self.fragments.views, cfg)

    @property
    def num_updates(self) -> int:
        """EMA updates applied so far."""
        return self.average.num_updates

    def update(self, step: int) -> None:
        """Average this rank's fp32 master partitions into the EMA at optimizer step `step` (decay
        warmup by step).
        """
        self.average.update(step)

    @contextlib.contextmanager
    def swap_into(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Compute with the average inside the block (collective); the master and weights are restored."""
        views = self.fragments.views
        with torch.no_grad():
            backup = {name: view.clone() for name, view in views.items()}
            for name, view in views.items():
                view.copy_(self.average.shadow[name])
            self.fragments.push_to_weights()
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, view in views.items():
                    view.copy_(backup[name])
                self.fragments.push_to_weights()

    def relink(self) -> None:
        """Look the master fragments up again (after a load, DeepSpeed may have relinked them)."""
        self.fragments.views = self.fragments.resolve()
        self.average._params = dict(self.fragments.views)

    @torch.no_grad()
    def load_full(self, full: dict[str, torch.Tensor]) -> None:
        """Set the average to full weights keyed by parameter name (another world size's assembled
        EMA, or another run's for `train.init_from`): this rank's fragments are cut from them.
        Names in `full` that are not averaged here (frozen parameters) are ignored."""
        missing = sorted(set(self.fragments.places) - set(full))
        if missing:
            raise UserError(f"the EMA to start from lacks {', '.join(missing[:5])}")
        for name, place in self.fragments.places.items():
            shadow = self.average.shadow[name]
            shadow.zero_()
            flat = full[name].to(torch.float32).reshape(-1)
            shadow[: place.numel] = flat[place.start : place.start + place.numel]

    def state_dict(self) -> dict[str, Any]:
        """This rank's EMA partitions, update count and the parameter places they were cut at."""
        places = {name: (p.start, p.numel, p.shape) for name, p in self.fragments.places.items()}
        return {**self.average.state_dict(), "places": places}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's EMA; ValueError when the saved partitions differ from this run's ZeRO
        partitions.
        """
        places = {name: (p.start, p.numel, p.shape) for name, p in self.fragments.places.items()}
        if state.get("places") != places:
            raise ValueError("the saved EMA partitions do not match this run's ZeRO partitions")
        self.relink()
        self.average.load_state_dict({"params": state["params"], "num_updates": state["num_updates"]})
