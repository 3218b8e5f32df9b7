"""Where this process sits in the job: torchrun's variables, SLURM's, or a lone process.

Every way fitscale starts ranks ends in the same place: the standard torch.distributed variables
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) in `os.environ`, so the
trainer's `init_distributed` and any `env://` rendezvous see one contract. torchrun and
`launch_local` set them directly; under SLURM (`srun`, submitit) `export_torch_env` derives them
from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the first node of the allocation and a port
derived from the job id, so every task of a job computes the same address without talking.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fitscale.compat import parse_node_list
from fitscale.errors import UserError

# Ports below Linux's ephemeral range (32768+), so a rendezvous port never collides with a client socket.
PORT_BASE = 20000
PORT_SPAN = 10000

# Applied with setdefault on CUDA: a profile's `env` or the user's shell wins.
NCCL_DEFAULTS = {
    # A rank that hits an NCCL error or timeout aborts instead of hanging, so the job fails and can requeue.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    # Warnings from NCCL reach the job log; INFO is the first thing to set when a multi-node job hangs.
    "NCCL_DEBUG": "WARN",
    # The flight recorder keeps the last collectives of every rank, dumped on a timeout.
    "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
}


@dataclass(frozen=True)
class DistributedEnv:
    """This process's place in the job (the one rank record): global rank and world size, rank and count
    on this node, its device, and who hosts the rendezvous.

    `device` is a `torch.device` once the trainer has joined on the device it asked for
    (`fitscale.parallel.mesh.init_distributed`); the records read from the environment before that
    (`rank_info_from_env`) carry None. `source` is "torchrun", "slurm" or "single".
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: Any = None  # torch.device; typed loosely so that reading the environment needs no torch
    node_rank: int = 0
    num_nodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"

    @property
    def is_main(self) -> bool:
        """Whether this process is global rank 0."""
        return self.rank == 0


def master_port_for_job(job_id: str | int) -> int:
    """A port every task of a SLURM job derives alike; jobs sharing a node get different ones."""
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise UserError(f"SLURM job id {job_id!r} has no digits to derive a port from")
    return PORT_BASE + int(digits) % PORT_SPAN


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed task counts: '2(x3),1' -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if match is None:
            raise UserError(f"cannot parse SLURM tasks-per-node {spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def first_hostname(nodelist: str) -> str:
    """The first node of a SLURM node list ('gpu[003-005],cpu1' -> 'gpu003'), via `scontrol show hostnames`.

    Falls back to submitit's parser where scontrol is not on PATH (e.g. inside some containers).
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import submitit  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            f"cannot expand SLURM node list {nodelist!r}: scontrol is not on PATH and submitit is not "
            "installed (pip install 'fitscale[slurm]')"
        ) from error
    return parse_node_list(nodelist)[0]


def _int(environ: Mapping[str, str], name: str) -> int:
    return int(environ[name])


def torchrun_rank_info(environ: Mapping[str, str]) -> DistributedEnv:
    """From the variables torchrun and `launch_local` set (RANK, WORLD_SIZE, LOCAL_RANK, ...)."""
    world = _int(environ, "WORLD_SIZE")
    local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    return DistributedEnv(
        rank=_int(environ, "RANK"),
        world_size=world,
        local_rank=int(environ.get("LOCAL_RANK", environ["RANK"])),
        local_world_size=local_world,
        node_rank=int(environ.get("GROUP_RANK", environ.get("NODE_RANK", 0))),
        num_nodes=max(1, world // max(1, local_world)),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(environ.get("MASTER_PORT", 29500)),
        source="torchrun",
    )


def slurm_rank_info(environ: Mapping[str, str]) -> DistributedEnv:
    """From a SLURM job step (`srun`, as submitit starts tasks): one task is one rank."""
    node_rank = int(environ.get("SLURM_NODEID", 0))
    per_node_spec = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1")
    per_node = expand_tasks_per_node(per_node_spec)
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
    return DistributedEnv(
        rank=_int(environ, "SLURM_PROCID"),
        world_size=int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS", 1)),
        local_rank=int(environ.get("SLURM_LOCALID", 0)),
        local_world_size=per_node[min(node_rank, len(per_node) - 1)],
        node_rank=node_rank,
        num_nodes=int(environ.get("SLURM_STEP_NUM_NODES") or environ.get("SLURM_JOB_NUM_NODES", 1)),
        master_addr=first_hostname(nodelist),
        master_port=master_port_for_job(environ.get("SLURM_JOB_ID", "0")),
        source="slurm",
    )


def rank_info_from_env(environ: Mapping[str, str] | None = None) -> DistributedEnv:
    """torchrun's variables if present, else a SLURM job step's, else a lone process.

    torchrun wins when both are present (torchrun inside an allocation manages its own ranks).
    SLURM counts only inside a step (`srun`): the batch script itself is one process even when
    the job has many tasks.
    """
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return torchrun_rank_info(environ)
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return slurm_rank_info(environ)
    return DistributedEnv(0, 1, 0, 1)


def export_torch_env(info: DistributedEnv, environ: MutableMapping[str, str] | None = None) -> None:
    """Write the standard torch.distributed variables, so `env://` and the trainer see this rank."""
    environ = os.environ if environ is None else environ
    environ.update(
        {
            "RANK": str(info.rank),
            "WORLD_SIZE": str(info.world_size),
            "LOCAL_RANK": str(info.local_rank),
            "LOCAL_WORLD_SIZE": str(info.local_world_size),
            "GROUP_RANK": str(info.node_rank),
            "NODE_RANK": str(info.node_rank),
            "MASTER_ADDR": info.master_addr,
            "MASTER_PORT": str(info.master_port),
        }
    )


def apply_nccl_defaults(environ: MutableMapping[str, str] | None = None) -> None:
    """Set NCCL_DEFAULTS in `environ` (os.environ by default) where the user has not set them."""
    environ = os.environ if environ is None else environ
    for name, value in NCCL_DEFAULTS.items():
        environ.setdefault(name, value)


def init_distributed_from_env(device: str = "auto", timeout_s: float = 1800) -> DistributedEnv:
    """Join the job's process group however it was started (torchrun, SLURM, `launch_local`, alone).

    Exports the torch.distributed variables (see the module docstring) when started as ranks,
    picks NCCL with sensible defaults on CUDA and gloo on CPU, binds each rank to GPU
    `LOCAL_RANK`, and initialises the default process group when there is more than one rank.
    Safe to call twice. The trainer joins through `fitscale.parallel.mesh.init_distributed`.
    `device`: "auto" (CUDA if available), "cuda" or "cpu".
    """
    import torch
    import torch.distributed as dist

    info = rank_info_from_env()
    if (
        info.source != "single"
    ):  # a lone process (e.g. `fitscale sample` in-process) leaves os.environ as it was
        export_torch_env(info)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        apply_nccl_defaults()
        torch.cuda.set_device(info.local_rank)
    if info.world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=torch.device("cuda", info.local_rank) if use_cuda else None,
        )
    return info


def leave_process_group() -> None:
    """Destroy the default process group (and every subgroup) at the end of a rank's work.

    Garbage from the run (FSDP modules, device meshes, optimizer state in reference cycles) can
    hold the last references to a group's C++ backend; freed during interpreter teardown, a gloo
    backend's worker threads are destroyed while still joinable and the rank dies with SIGABRT
    ("terminate called without an active exception") after its work succeeded. Collecting that
    garbage before and after the destroy frees every backend while the interpreter is whole.
    A no-op when no group was started.
    """
    import gc

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()
    gc.collect()


def allreduce_check(device: str = "cpu") -> dict[str, object]:
    """A cluster sanity check: join the job's group and all-reduce rank + 1 (the sum is n(n+1)/2).

    `fitscale launch` tests and new cluster profiles start with this before a real run.
    """
    import torch
    import torch.distributed as dist

    info = init_distributed_from_env(device=device)
    value = torch.tensor([float(info.rank + 1)])
    if info.world_size > 1:
        dist.all_reduce(value)
        leave_process_group()
    return {
        "rank": info.rank,
        "world_size": info.world_size,
        "local_rank": info.local_rank,
        "node_rank": info.node_rank,
        "master": f"{info.master_addr}:{info.master_port}",
        "source": info.source,
        "sum": value.item(),
    }
