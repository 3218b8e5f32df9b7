"""FSDP2: `fully_shard` each transformer block, then the root, in a chosen precision."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from fitscale.config.parallel import ParallelConfig

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtypes(cfg: ParallelConfig, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(param_dtype, reduce_dtype): `auto` is bf16 compute on CUDA and fp32 on CPU."""
    param = cfg.param_dtype
    if param == "auto":
        param = "bf16" if device.type == "cuda" else "fp32"
    reduce = cfg.reduce_dtype if cfg.reduce_dtype != "auto" else "fp32"
    return _DTYPES[param], _DTYPES[reduce]


def apply_fsdp(
    model: torch.nn.Module,
    mesh: DeviceMesh,
    cfg: ParallelConfig,
    device: torch.device,
) -> torch.nn.Module:
    """Shard `model` in place over `mesh` (1-D: full shard; 2-D: HSDP or replication).

    Parameters stay fp32 (the master weights); each forward gathers them in `param_dtype` and
    gradients are reduced in `reduce_dtype`. FSDP averages gradients over the ranks; since the loss
    is already divided by the global image count of the step (fitscale.flow.loss), the Trainer
    multiplies it by the world size before backward so the average becomes the needed sum
    (a custom divide factor would need PREMUL_SUM, which gloo lacks).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    param_dtype, reduce_dtype = resolve_dtypes(cfg, device)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.blocks)
    for index, block in enumerate(blocks):
        # The last block's parameters are gathered again right away by the root's backward: keep them.
        reshard = cfg.reshard_after_forward and index < len(blocks) - 1
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.reshard_after_forward)
    if cfg.fsdp_prefetch:
        prefetch_blocks(blocks, cfg.fsdp_prefetch)
    return model


def prefetch_blocks(blocks: list, depth: int) -> None:
    """Block i all-gathers blocks i+1..i+depth on entering forward, and i-1..i-depth (nearest first)
    on entering backward: the order every step runs them in, as the blocks run in a fixed order."""
    for index, block in enumerate(blocks):
        block.set_modules_to_forward_prefetch(blocks[index + 1 : index + 1 + depth])
        block.set_modules_to_backward_prefetch(blocks[max(0, index - depth) : index][::-1])
