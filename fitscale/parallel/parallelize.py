"""`parallelize`: every transformation that makes a plain model train at scale, in one fixed order.

The order is torchtitan's (`torchtitan/models/llama3/infra/parallelize.py`, `parallelize_llama`):
low-precision matmuls convert `nn.Linear` layers first, so that activation checkpointing wraps and
recomputes the converted layers; activation checkpointing wraps blocks before `torch.compile`, so
each compiled graph holds the recomputation; compile comes before FSDP2, whose hooks must stay
outside the compiled blocks; FSDP2 shards last. DeepSpeed (fitscale.parallel.backend) calls it
without a mesh, then wraps the compiled model in its engine.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh

from fitscale.config.parallel import ParallelConfig
from fitscale.parallel.ac import apply_ac
from fitscale.parallel.compile import apply_compile
from fitscale.parallel.float8 import Float8Report, apply_float8
from fitscale.parallel.fsdp import apply_fsdp


def parallelize(
    model: torch.nn.Module,
    config: ParallelConfig,
    mesh: DeviceMesh | None,
    device: torch.device,
    compile_mode: str | None = None,
    eager_hooks: bool = False,
) -> Float8Report:
    """Apply, in place and in order: float8 linears (`parallel.float8`), activation checkpointing,
    per-block `torch.compile` (in `compile_mode`, torch.compile's), then FSDP2 over `mesh` (skipped
    when `mesh` is None: one process, or a backend that shards the model itself). Returns the
    report of which linears became float8. `eager_hooks`: compile only each block's forward, so the
    parameter hooks of a backend that shards the model itself (ZeRO-3) stay eager.

    `model` may live on the meta device (FSDP2: materialise and initialise afterwards) or hold
    its weights already (DeepSpeed). Raises ValueError for an unknown activation-checkpointing mode,
    ConfigError for float8 without torchao or a GPU with float8 matmuls.
    """
    # 1. float8 linears (fitscale/parallel/float8.py).
    report = apply_float8(model, config, device)
    # 2. activation checkpointing of whole blocks (recomputes the converted linears too).
    apply_ac(model, config.activation_checkpointing, config.ac_every)
    # 3. torch.compile per block (one graph every block reuses). With `eager_hooks` (DeepSpeed), only
    #    each block's forward: ZeRO-3's parameter hooks stay eager (fitscale.parallel.compile).
    apply_compile(model, config.compile, mode=compile_mode, eager_hooks=eager_hooks)
    # 4. FSDP2: each block, then the root.
    if mesh is not None:
        apply_fsdp(model, mesh, config, device)
    return report
