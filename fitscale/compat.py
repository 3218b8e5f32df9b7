"""The private APIs of other libraries that fitscale uses, each in this one place.

Each entry has no public equivalent in the version named beside it (the versions fitscale's
tests run with); tests/unit/test_compat.py fails, naming the entry and the installed version,
when a library no longer has one. DeepSpeed's are kept with the code that needs their layout
(fitscale.parallel.deepspeed_ema, fitscale.parallel.deepspeed, fitscale.checkpoint.deepspeed) and
checked by the same test.
Nothing here imports a library until it is called, so importing fitscale stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CHECKED_VERSIONS = {
    "torch": "2.14.1",
    "torchdata": "0.11.0",
    "mosaicml-streaming": "0.13.0",
    "submitit": "1.5.4",
    "deepspeed": "0.19.8",
}

# --- torch ---------------------------------------------------------------------------------


def checkpoint_wrapper(module, **options):
    """torch's activation-checkpoint module wrapper (`torch.distributed.algorithms._checkpoint`,
    torch 2.14.1; what torchtitan uses too). Its parameters gain the `_checkpoint_wrapped_module`
    name segment (fitscale.models.official.clean_parameter_name drops it)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper as wrap

    return wrap(module, **options)


def foreach_copy_(targets: Sequence, sources: Sequence) -> None:
    """`targets[i].copy_(sources[i])` for all i in one kernel per device and dtype (`torch._foreach_copy_`,
    torch 2.14.1, what torch.optim's foreach implementations call)."""
    import torch

    torch._foreach_copy_(targets, sources)


def foreach_lerp_(targets: Sequence, ends: Sequence, weight: float) -> None:
    """`targets[i].lerp_(ends[i], weight)` for all i at once (`torch._foreach_lerp_`, torch 2.14.1,
    what torch.optim.swa_utils' EMA uses)."""
    import torch

    torch._foreach_lerp_(targets, ends, weight)


def fused_optimizer_device_types() -> set[str]:
    """Device types that have torch's fused Adam/AdamW kernels
    (`torch.optim.optimizer._get_fused_kernels_supported_devices`, torch 2.14.1; AdamW's own
    constructor does not refuse every other device, e.g. "meta")."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    return set(_get_fused_kernels_supported_devices())


def set_last_lr(scheduler, rates: list[float]) -> None:
    """Set what `scheduler.get_last_lr()` returns (`LRScheduler._last_lr`, torch 2.14.1; there is
    no public setter, and the scheduler writes it only inside `step()`)."""
    scheduler._last_lr = list(rates)


# --- torchdata -----------------------------------------------------------------------------


def shutdown_node_workers(node) -> None:
    """Stop the worker threads or processes behind a torchdata node and every node it wraps
    (each node's running iterator `_it` and its `_shutdown()`, torchdata 0.11.0; nodes have no
    public close)."""
    iterator = getattr(node, "_it", None)
    while iterator is not None:
        if hasattr(iterator, "_shutdown"):
            iterator._shutdown()
        iterator = getattr(iterator, "_it", None)


# --- MosaicML Streaming --------------------------------------------------------------------


def shard_state(dataset, shard: int) -> int:
    """A StreamingDataset's shared state of `shard` (REMOTE, PREPARING, LOCAL, ...; `_shard_states`,
    mosaicml-streaming 0.13.0)."""
    return int(dataset._shard_states[shard])


def touch_shard(dataset, shard: int, now_ns: int) -> None:
    """Record an access to `shard` as `StreamingDataset.get_item` does, so that cache eviction
    (coldest shard first) sees it (`_shard_access_times`, mosaicml-streaming 0.13.0)."""
    dataset._shard_access_times[shard] = now_ns


def shm_registration_path(prefix: int, name: str) -> str:
    """The shared-memory file name of Streaming's registration `name` under `prefix`
    (`streaming.base.shared.prefix._get_path`, mosaicml-streaming 0.13.0)."""
    from streaming.base.shared.prefix import _get_path

    return _get_path(prefix, name)


def registered_locals(data: bytes) -> tuple[list[str], int]:
    """(local folders, prefix) of a Streaming registration file's bytes
    (`streaming.base.shared.prefix._unpack_locals`, mosaicml-streaming 0.13.0)."""
    from streaming.base.shared.prefix import _unpack_locals

    return _unpack_locals(data)


# --- submitit ------------------------------------------------------------------------------

# The module submitit's own batch scripts run in every task (submitit 1.5.4).
SUBMITIT_TASK_MODULE = "submitit.core._submit"


def sbatch_string(**parameters: Any) -> str:
    """The batch script submitit's SlurmExecutor writes for these parameters
    (`submitit.slurm.slurm._make_sbatch_string`, submitit 1.5.4)."""
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(**parameters)


def sbatch_parameter_names() -> set[str]:
    """The keyword parameters `sbatch_string` takes, besides command, folder and map_count."""
    import inspect

    from submitit.slurm.slurm import _make_sbatch_string

    return set(inspect.signature(_make_sbatch_string).parameters) - {"command", "folder", "map_count"}


def parse_node_list(nodelist: str) -> list[str]:
    """Host names of a SLURM node list ('gpu[003-005],cpu1' -> ['gpu003', 'gpu004', 'gpu005', 'cpu1'])
    (`submitit.slurm.slurm._parse_node_list`, submitit 1.5.4; its public `JobEnvironment.hostnames`
    reads only the current job's list)."""
    from submitit.slurm.slurm import _parse_node_list

    return _parse_node_list(nodelist)
