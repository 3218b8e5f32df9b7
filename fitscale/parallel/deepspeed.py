"""DeepSpeed ZeRO-2/3 as a second backend driving the same model, loss and data as FSDP2.

The Trainer keeps control of the loop. It forwards through the engine, not the bare module:
`engine.forward` is where DeepSpeed advances its micro-step counter, and ZeRO-2/3 copy the first
micro-batch's gradient partition and add the later ones only when that counter has moved, so a
forward that bypasses the engine silently keeps the last micro-batch's gradient alone. The
Trainer marks the last micro-batch as the accumulation boundary itself (the count of
micro-batches may change from step to step with packing) and scales the loss so that
DeepSpeed's averaging over ranks yields the sum the global-image normalisation expects.

Precision mirrors FSDP's policy: the parameters stay fp32 (the master weights) and bf16 compute
is torch autocast inside the engine's forward; gradients are reduced (and ZeRO-3 parameters
gathered) in fp32 unless `parallel.reduce_dtype=bf16`.

On CPU, DeepSpeed's communication backend would JIT-compile a shared-memory all-reduce kernel
the first time it starts (minutes on a small machine, with the other ranks queued behind a file
lock, which looks like a hang right after start-up). Training never calls that kernel (it serves
DeepSpeed inference's all-reduce, and only under the `deepspeed` launcher), so it is switched
off and ZeRO's collectives run on our gloo group.

ZeRO-3 gathers each transformer block's parameters in one hook on the block (a "leaf" module, as
FSDP2 gathers per block), so a block compiled by `parallel.compile` holds no ZeRO hook and is not
recompiled by their Python state; `parallel.sharding=hybrid` is ZeRO++'s hpZ (`hpz_partition_size`).

Checkpoint files (ZeRO partitions, the EMA's, universal conversion for another world size) are
fitscale.checkpoint.deepspeed's.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from fitscale.config.parallel import ParallelConfig
from fitscale.config.train import TrainConfig
from fitscale.parallel.fsdp import resolve_dtypes
from fitscale.parallel.mesh import DistributedEnv

_SHARED_MEMORY_OP = "deepspeed_shm_comm"
_AUTOCAST_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


INSTALL_HINT = "parallel.backend=deepspeed needs DeepSpeed: pip install 'fitscale[deepspeed]'"


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(INSTALL_HINT) from error
    return deepspeed


def deepspeed_problems(config) -> list[str]:
    """What keeps a RunConfig from running on DeepSpeed, each naming the fix ([] for other backends).

    Needs no process group and imports no DeepSpeed, so launchers check it before starting ranks.
    """
    import importlib.util

    if config.parallel.backend != "deepspeed":
        return []
    problems = []
    if importlib.util.find_spec("deepspeed") is None:
        problems.append(f"{INSTALL_HINT} (it is not installed in {sys.executable})")
    return problems


def hpz_partition_size(cfg: ParallelConfig, world_size: int, local_world_size: int) -> int:
    """ZeRO++ hpZ group size for `parallel.sharding=hybrid` (ZeRO-3): `shard_size`, 0 meaning the
    ranks of one node, as FSDP's HSDP; 1 (hpZ off) when that group would hold every rank or one."""
    if cfg.sharding != "hybrid" or cfg.zero_stage != 3:
        return 1
    size = cfg.shard_size or local_world_size
    return size if 1 < size < world_size else 1


def deepspeed_config(cfg: ParallelConfig, train: TrainConfig, env: DistributedEnv) -> dict[str, Any]:
    """The DeepSpeed JSON config equivalent to our parallel and train sections."""
    param_dtype, reduce_dtype = resolve_dtypes(cfg, env.device)
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    hpz = hpz_partition_size(cfg, env.world_size, env.local_world_size)
    if hpz > 1:
        zero["zero_hpz_partition_size"] = hpz
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if param_dtype != torch.float32:
        # An empty list keeps every parameter's communication in fp32; DeepSpeed's default list
        # (linear and convolution layers) communicates those in the compute dtype.
        low_precision = {} if reduce_dtype == param_dtype else {"lower_precision_safe_modules": []}
        config["torch_autocast"] = {
            "enabled": True,
            "dtype": _AUTOCAST_NAMES[param_dtype],
            **low_precision,
        }
    return config


def _skip_shared_memory_kernel(deepspeed) -> None:
    """Mark DeepSpeed's CPU shared-memory all-reduce op unavailable so it is never compiled."""
    compatible = deepspeed.ops.__compatible_ops__  # probed once per process, then cached and editable
    compatible[_SHARED_MEMORY_OP] = False


def _maybe_init_single_process_group(env: DistributedEnv) -> None:
    """DeepSpeed needs a process group and the launcher's variables even for one process."""
    import os

    import torch.distributed as dist

    if env.world_size == 1 and not dist.is_initialized():
        for name, value in (("RANK", 0), ("LOCAL_RANK", env.local_rank), ("WORLD_SIZE", 1)):
            os.environ.setdefault(name, str(value))
        backend = "nccl" if env.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def build_deepspeed_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: ParallelConfig,
    train: TrainConfig,
    env: DistributedEnv,
):
    """Wrap `model` and our optimizer in a DeepSpeed engine (ZeRO stage from the config).

    Forward through the returned engine (see the module docstring for why).
    """
    deepspeed = _import_deepspeed()
    if env.device.type == "cpu":
        _skip_shared_memory_kernel(deepspeed)
    _maybe_init_single_process_group(env)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, train, env),
        dist_init_required=False,
    )
    return engine


def global_grad_norm(engine) -> float:
    """The L2 norm of this step's whole gradient over every rank, before the engine's step (collective).

    Measured as ZeRO's own step measures it (its per-group `get_grad_norm_direct` over this rank's
    reduced gradient partitions, all-reduced over the data-parallel group), so the trainer can skip a
    step whose gradient is not finite before DeepSpeed applies it. ZeRO reports a non-finite group as
    -1; any such group makes the result inf. Call after the last micro-batch's backward (the
    accumulation boundary), when the partitions hold the step's reduced gradient.
    """
    optimizer = engine.optimizer
    if hasattr(optimizer, "bit16_groups"):  # ZeRO-1/2: partitions of each group's flat buffer
        groups = [
            optimizer.get_grad_norm_direct(optimizer.averaged_gradients[i], optimizer.params_in_partition[i])
            for i in range(len(optimizer.bit16_groups))
        ]
    else:  # ZeRO-3: sub-groups of partitioned parameters
        groups = optimizer._get_norm_groups()
    norms = torch.stack([torch.as_tensor(norm, dtype=torch.float64).reshape(()).cpu() for norm in groups])
    if bool((norms < 0).any()) or not bool(torch.isfinite(norms).all()):
        return float("inf")
    return float(norms.square().sum().sqrt()) / float(getattr(optimizer, "loss_scale", 1.0) or 1.0)
