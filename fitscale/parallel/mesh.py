"""Process group and device mesh from the environment torchrun, SLURM or our launcher sets."""

from __future__ import annotations

import dataclasses
import os

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from fitscale.config.errors import ConfigError
from fitscale.config.parallel import ParallelConfig
from fitscale.runtime.env import DistributedEnv, init_distributed_from_env


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
    """Join the job's process group (`fitscale.runtime.env.init_distributed_from_env`) on the
    device `train.device` asks for; a lone process needs no group.

    Raises ConfigError when `train.device=cuda` and CUDA is not available.
    """
    device = resolve_device(requested_device)
    info = init_distributed_from_env(device.type, timeout_s)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    return dataclasses.replace(info, device=device)


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
