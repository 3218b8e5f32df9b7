"""`torch.compile` per transformer block: fast to compile, and every block reuses one graph."""

from __future__ import annotations

import torch


def apply_compile(
    model: torch.nn.Module, enabled: bool = True, mode: str | None = None, eager_hooks: bool = False
) -> None:
    """Compile each block of `model.blocks` in place (after activation checkpointing, before FSDP).

    `nn.Module.compile` keeps parameter names unchanged, so checkpoints and `train.trainable`
    patterns do not depend on whether compilation is on. `mode` is torch.compile's (e.g.
    "max-autotune-no-cudagraphs": benchmarks matmul and fused kernels at first compile).

    `eager_hooks` compiles only the `forward` of each block (under an activation-checkpoint
    wrapper, the wrapped block's), so module hooks run eagerly around the graph: DeepSpeed ZeRO-3
    gathers and releases a block's parameters in such hooks, whose Python state (a step counter)
    torch.compile would otherwise trace and recompile on at every call.
    """
    if not enabled:
        return
    for block in model.blocks:
        if not eager_hooks:
            block.compile(mode=mode)
            continue
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        inner.forward = torch.compile(inner.forward, mode=mode)
