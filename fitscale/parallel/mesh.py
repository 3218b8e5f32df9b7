"""Process group and device mesh from the environment torchrun, SLURM or our launcher sets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fitscale.config.errors import ConfigError
from fitscale.config.parallel import ParallelConfig


@dataclass(frozen=True)
class DistributedEnv:
    """Where this process sits: global rank and world size, rank and count on this node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process is global rank 0."""
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def resolve_device(requested: str) -> torch.device:
    """The device of this rank for train.device auto|cpu|cuda (cuda:LOCAL_RANK); ConfigError for cuda
    without CUDA.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but CUDA is not available here; set train.device=cpu or auto")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0))


def init_distributed(requested_device: str = "auto", timeout_s: float = 1800) -> DistributedEnv:
    """Join the process group described by the environment; a lone process needs no group.

    torchrun (and `fitscale train --nproc`) set RANK/WORLD_SIZE/MASTER_ADDR; under SLURM the
    launcher exports the same variables. gloo on CPU, nccl on CUDA.
    """
    rank = _env_int("RANK", default=0)
    world_size = _env_int("WORLD_SIZE", default=1)
    local_rank = _env_int("LOCAL_RANK", default=rank)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", default=world_size)
    device = resolve_device(requested_device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if device.type == "cuda" else None,
        )
    return DistributedEnv(rank, world_size, local_rank, local_world_size, device)


def build_mesh(cfg: ParallelConfig, env: DistributedEnv) -> DeviceMesh | None:
    """The data-parallel mesh: 1-D ("shard",) for full sharding, 2-D ("replicate", "shard") otherwise.

    `none` is a 2-D mesh with shard size 1 (pure replication), so all modes share one code path.
    """
    if env.world_size == 1:
        return None
    if cfg.sharding == "full":
        return init_device_mesh(env.device.type, (env.world_size,), mesh_dim_names=("shard",))
    shard = 1 if cfg.sharding == "none" else (cfg.shard_size or env.local_world_size)
    if env.world_size % shard:
        raise ConfigError(
            f"parallel.shard_size={shard} does not divide the world size {env.world_size}; "
            f"set parallel.shard_size to a divisor of {env.world_size}"
        )
    return init_device_mesh(
        env.device.type, (env.world_size // shard, shard), mesh_dim_names=("replicate", "shard")
    )
