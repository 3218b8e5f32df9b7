"""Activation checkpointing of transformer blocks: off, every block, or every k-th block."""

from __future__ import annotations

import torch

from fitscale.compat import checkpoint_wrapper


def apply_ac(model: torch.nn.Module, mode: str = "off", every: int = 2) -> int:
    """Wrap blocks of `model.blocks` in place so backward recomputes their activations.

    `full` wraps every block, `every` blocks 0, k, 2k, ... (trading less recomputation for
    more memory). Returns how many blocks were wrapped.
    """
    if mode == "off":
        return 0
    if mode not in ("full", "every"):
        raise ValueError(f"activation checkpointing mode {mode!r} is not off, full or every")
    step = 1 if mode == "full" else every
    wrapped = 0
    for index, block in enumerate(model.blocks):
        if index % step == 0:
            model.blocks[index] = checkpoint_wrapper(block, preserve_rng_state=True)
            wrapped += 1
    return wrapped
