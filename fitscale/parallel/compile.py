"""`torch.compile` per transformer block: fast to compile, and every block reuses one graph."""

from __future__ import annotations

import torch


def apply_compile(model: torch.nn.Module, enabled: bool = True, mode: str | None = None) -> None:
    """Compile each block of `model.blocks` in place (after activation checkpointing, before FSDP).

    `nn.Module.compile` keeps parameter names unchanged, so checkpoints and `train.trainable`
    patterns do not depend on whether compilation is on. `mode` is torch.compile's (e.g.
    "max-autotune-no-cudagraphs": benchmarks matmul and fused kernels at first compile).
    """
    if not enabled:
        return
    for block in model.blocks:
        block.compile(mode=mode)
