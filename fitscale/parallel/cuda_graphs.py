"""CUDA graphs for the compiled transformer blocks (`train.cuda_graphs`), and the static shapes they need.

A CUDA graph replays a recorded sequence of kernels, removing their launch cost from the host;
it needs every replay to see the same shapes and the same python scalars. With
`data.pad_to_budget` every micro-batch already has one token count; the segment count S and
`max_seqlen` still vary with the images drawn. `static_model_inputs` appends zero-length segments
(timestep 1, the null class, a 1x1 grid) up to a fixed count and fixes `max_seqlen`, as
tools/bench_train.py's `+static` mode does: a segment without tokens attends to nothing and
changes no token's output, so the velocity, the loss and the gradients stay those of the batch.
Blocks are compiled in torch.compile's "reduce-overhead" mode (cudagraph trees).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fitscale.config import RunConfig
from fitscale.config.errors import ConfigError
from fitscale.data.batch import PADDING_SEGMENT_TOKENS
from fitscale.errors import UserError

CUDA_GRAPHS_COMPILE_MODE = "reduce-overhead"


@dataclass(frozen=True)
class StaticShapes:
    """The shapes every captured forward sees, so one CUDA graph per block replays on every step:
    the segment count S (the length of t, y and cu_seqlens - 1) and the `max_seqlen` scalar."""

    num_segments: int  # S of every forward: images, padding segments, then zero-length segments
    max_seqlen: int  # the `max_seqlen` every forward is given


def static_shapes(config: RunConfig) -> StaticShapes:
    """The largest S and segment a `data.token_budget` micro-batch can hold: at most
    budget // min_image_tokens images plus the padding tail's segments of at most
    PADDING_SEGMENT_TOKENS tokens (fitscale.data.batch), and images of at most max_image_tokens."""
    data = config.data
    images = data.token_budget // data.min_image_tokens
    padding = math.ceil(data.token_budget / PADDING_SEGMENT_TOKENS)
    return StaticShapes(images + padding, max(data.max_image_tokens, PADDING_SEGMENT_TOKENS))


def static_model_inputs(
    shapes: StaticShapes,
    null_class: int,
    x: torch.Tensor,  # (T, C)
    t: torch.Tensor,  # (S,)
    y: torch.Tensor,  # (S,)
    pos: torch.Tensor,  # (T, 2)
    cu_seqlens: torch.Tensor,  # (S+1,) int32
    max_seqlen: int | None,
    sizes: torch.Tensor | None,  # (S, 2)
) -> tuple[tuple, dict]:
    """The model's arguments with S = `shapes.num_segments` and max_seqlen = `shapes.max_seqlen`.

    Device tensors are extended on their device (no host sync). Raises ValueError when the batch
    already has more segments, or a longer `max_seqlen`, than the static shapes allow.
    """
    segments = int(cu_seqlens.numel()) - 1
    extra = shapes.num_segments - segments
    if extra < 0 or (max_seqlen is not None and max_seqlen > shapes.max_seqlen):
        raise UserError(
            f"train.cuda_graphs: a micro-batch of {segments} segments (longest {max_seqlen}) exceeds the "
            f"static shapes ({shapes.num_segments} segments, longest {shapes.max_seqlen}); "
            "check data.token_budget, data.min_image_tokens and data.max_image_tokens"
        )
    if sizes is None:
        raise ValueError("train.cuda_graphs: the model needs `sizes` to append zero-length segments")
    t = torch.cat([t, t.new_ones(extra)])
    y = torch.cat([y, y.new_full((extra,), null_class)])
    cu_seqlens = torch.cat([cu_seqlens, cu_seqlens[-1:].expand(extra)])
    sizes = torch.cat([sizes, sizes.new_ones((extra, 2))])
    return (x, t, y, pos, cu_seqlens), {"max_seqlen": shapes.max_seqlen, "sizes": sizes}


def apply_static_shapes(model: nn.Module, shapes: StaticShapes, mark_step: bool = False) -> None:
    """Give every forward of `model` the static shapes (a forward pre-hook on the root module).

    `mark_step`: each forward starts a new cudagraph-trees step (the previous replay's outputs may be
    overwritten: the previous micro-batch's backward has run by then)."""
    null_class = model.config.num_classes

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        names = ("x", "t", "y", "pos", "cu_seqlens", "max_seqlen", "sizes")
        values = dict(zip(names, args)) | kwargs
        values.setdefault("max_seqlen", None)
        values.setdefault("sizes", None)
        return static_model_inputs(shapes, null_class, **values)

    model.register_forward_pre_hook(hook, with_kwargs=True)


def maybe_apply_cuda_graphs(
    model: nn.Module, config: RunConfig, device: torch.device, world_size: int
) -> str | None:
    """With `train.cuda_graphs`: check the run can use them, give the model static shapes and return
    the compile mode of the blocks ("reduce-overhead"); otherwise None (the default compile mode).

    Raises ConfigError on a CPU, or on more than one rank (FSDP's collectives run inside each
    block's hooks, which a graph replay would skip).
    """
    if not config.train.cuda_graphs:
        return None
    if device.type != "cuda":
        raise ConfigError(
            f"train.cuda_graphs=true needs a CUDA device, this run is on {device.type}; "
            "set train.cuda_graphs=false"
        )
    if world_size > 1:
        raise ConfigError(
            f"train.cuda_graphs=true runs on one GPU only, this run has {world_size} ranks; "
            "set train.cuda_graphs=false"
        )
    apply_static_shapes(model, static_shapes(config), mark_step=True)
    return CUDA_GRAPHS_COMPILE_MODE
