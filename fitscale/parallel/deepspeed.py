"""DeepSpeed ZeRO-2/3 as a second backend driving the same model, loss and data as FSDP2.

The Trainer keeps control of the loop: it calls the model directly (ZeRO-3's hooks live on the
module), marks the last micro-batch as the accumulation boundary itself (the count of
micro-batches may change from step to step with packing), and scales the loss so that
DeepSpeed's averaging over ranks yields the sum the global-image normalisation expects.

Checkpoints: DeepSpeed writes its own per-rank ZeRO partitions (weights and optimizer state)
under `<run_dir>/deepspeed/step-N` before the CheckpointManager makes step N visible, so a
visible step always has its DeepSpeed part complete. Those partitions load on the same world
size only; to change the world size, export the weights (`fitscale convert export`) and start a
new run with `train.init_from`, or use FSDP, which reshards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fitscale.config.parallel import ParallelConfig
from fitscale.config.train import TrainConfig
from fitscale.parallel.fsdp import resolve_dtypes
from fitscale.parallel.mesh import DistributedEnv

SUBFOLDER = "deepspeed"


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "parallel.backend=deepspeed needs DeepSpeed: pip install 'fitscale[deepspeed]'"
        ) from error
    return deepspeed


def deepspeed_config(cfg: ParallelConfig, train: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config equivalent to our parallel and train sections."""
    param_dtype, _ = resolve_dtypes(cfg, device)
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": param_dtype == torch.bfloat16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def build_deepspeed_engine(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: ParallelConfig,
    train: TrainConfig,
    env: DistributedEnv,
):
    """Wrap `model` and our optimizer in a DeepSpeed engine (ZeRO stage from the config)."""
    deepspeed = _import_deepspeed()
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(cfg, train, env.device),
        dist_init_required=False,
    )
    return engine


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / SUBFOLDER


def save_deepspeed_state(engine, run_dir: str | Path, step: int) -> None:
    """Weights and optimizer partitions of every rank, as DeepSpeed lays them out."""
    engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=f"step-{step}", save_latest=False)


def load_deepspeed_state(engine, run_dir: str | Path, step: int) -> None:
    folder = checkpoint_dir(run_dir) / f"step-{step}"
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is missing: the checkpoint of step {step} was not written by the DeepSpeed backend"
        )
    load_path, _ = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=f"step-{step}")
    if load_path is None:
        raise RuntimeError(
            f"DeepSpeed could not load {folder}; its partitions load on the world size that wrote them only"
        )
