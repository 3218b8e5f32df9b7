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

Checkpoints: DeepSpeed writes its own per-rank ZeRO partitions (weights and optimizer state)
under `<run_dir>/deepspeed/step-N`, beside the EMA's partitions (`ema-rank-R.pt`,
fitscale.parallel.deepspeed_ema), with a small `fitscale.json` naming the world size and ZeRO
stage that wrote them, before the CheckpointManager publishes step N (whose DCP part holds the
LR schedule, data position, RNG and progress), so a visible step always has its DeepSpeed part.
Resuming on the same world size loads DeepSpeed's own files and continues bit-identically. On
another world size (same ZeRO stage), rank 0 converts the step once to DeepSpeed's universal
checkpoint (`ds_to_universal`, into `<run_dir>/deepspeed/universal/step-N`), every rank loads
its new partitions with `load_universal`, the EMA is cut again from its assembled files, and the
data position follows the data pipeline's own elastic rule (the DCP part). A ZeRO stage change
is refused before anything is loaded, naming both stages: `export_deepspeed_weights`
consolidates a step's full fp32 weights into one safetensors file, and a new run starts from it
with `train.init_from=FILE` (weights only: the optimizer state, schedule and data position start
afresh).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from fitscale.config.parallel import ParallelConfig
from fitscale.config.train import TrainConfig
from fitscale.parallel.agree import all_ranks_agree, rank0_decides
from fitscale.parallel.fsdp import resolve_dtypes
from fitscale.parallel.mesh import DistributedEnv

SUBFOLDER = "deepspeed"
UNIVERSAL = "universal"  # <run_dir>/deepspeed/universal/step-N: a step converted for another world size
METADATA = "fitscale.json"
_SHARED_MEMORY_OP = "deepspeed_shm_comm"
_AUTOCAST_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


class DeepSpeedResumeError(ValueError):
    """A DeepSpeed checkpoint cannot be loaded by this run (world size or ZeRO stage differ)."""


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


def deepspeed_config(cfg: ParallelConfig, train: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON config equivalent to our parallel and train sections."""
    param_dtype, reduce_dtype = resolve_dtypes(cfg, device)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
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
        config=deepspeed_config(cfg, train, env.device),
        dist_init_required=False,
    )
    return engine


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where a DeepSpeed run keeps its checkpoints: `<run_dir>/deepspeed`."""
    return Path(run_dir) / SUBFOLDER


def step_dir(run_dir: str | Path, step: int) -> Path:
    """The DeepSpeed checkpoint folder of `step`: `<run_dir>/deepspeed/step-N`."""
    return checkpoint_dir(run_dir) / f"step-{step}"


def save_deepspeed_state(
    engine, run_dir: str | Path, step: int, complete_steps: list[int] | None = None, ema=None
) -> None:
    """Weights and optimizer partitions of every rank, as DeepSpeed lays them out, and the EMA's
    partitions (fitscale.parallel.deepspeed_ema) when `ema` is given (collective).

    `complete_steps` (the published checkpoints) lets rank 0 remove the DeepSpeed folders of
    steps the CheckpointManager has since pruned: only older steps absent from that list go, so
    a step still being published (asynchronous saving) keeps its part.
    """
    if ema is not None:  # before DeepSpeed's files, whose save ends in a barrier; the metadata comes last
        from fitscale.parallel.deepspeed_ema import save_ema

        save_ema(ema, step_dir(run_dir, step), engine.global_rank)
    engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=f"step-{step}", save_latest=False)
    if engine.global_rank != 0:
        return
    metadata = {"step": step, "world_size": engine.world_size, "zero_stage": engine.zero_optimization_stage()}
    (step_dir(run_dir, step) / METADATA).write_text(json.dumps(metadata))
    if complete_steps:
        _prune(run_dir, keep=set(complete_steps) | {step}, below=max(complete_steps))


def _prune(run_dir: str | Path, keep: set[int], below: int) -> None:
    folders = [*checkpoint_dir(run_dir).glob("step-*"), *(checkpoint_dir(run_dir) / UNIVERSAL).glob("step-*")]
    for folder in folders:
        suffix = folder.name.removeprefix("step-")
        if suffix.isdigit() and int(suffix) < below and int(suffix) not in keep:
            shutil.rmtree(folder, ignore_errors=True)


def check_resumable(run_dir: str | Path, step: int, world_size: int, zero_stage: int) -> tuple[Path, int]:
    """The DeepSpeed folder of `step` and the world size that wrote it, after checking this run can
    load it (any world size, the same ZeRO stage); raises a clear error otherwise."""
    folder = step_dir(run_dir, step)
    metadata_file = folder / METADATA
    if not metadata_file.is_file():
        raise FileNotFoundError(
            f"{metadata_file} is missing: the checkpoint of step {step} was not written by the DeepSpeed "
            "backend (resume it with parallel.backend=fsdp) or its DeepSpeed part is incomplete"
        )
    saved = json.loads(metadata_file.read_text())
    if saved["zero_stage"] != zero_stage:
        raise DeepSpeedResumeError(
            f"{folder} holds ZeRO-{saved['zero_stage']} partitions of {saved['world_size']} ranks; this run has "
            f"{world_size} ranks and ZeRO-{zero_stage}. DeepSpeed checkpoints resume with the ZeRO stage that "
            f"wrote them (on any world size): rerun with parallel.zero_stage={saved['zero_stage']}, or "
            f"consolidate the weights with fitscale.parallel.deepspeed.export_deepspeed_weights("
            f"{str(run_dir)!r}, {step}, OUT) and start a new run with train.init_from=OUT (optimizer state and "
            "data position start afresh)"
        )
    return folder, int(saved["world_size"])


def universal_step_dir(run_dir: str | Path, step: int) -> Path:
    """The universal-checkpoint conversion of `step`, for resuming on another world size."""
    return checkpoint_dir(run_dir) / UNIVERSAL / f"step-{step}"


def convert_to_universal(run_dir: str | Path, step: int) -> Path:
    """DeepSpeed's universal checkpoint of step `step` (`ds_to_universal`): per-parameter fp32
    weights and optimizer moments that any world size loads. Written once, beside the step, through
    a temporary folder and a rename; one process."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = universal_step_dir(run_dir, step)
    if out.is_dir():
        return out
    partial = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(partial, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(step_dir(run_dir, step)),
        output_folder=str(partial),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with contextlib.redirect_stdout(io.StringIO()):  # its progress report
        ds_to_universal(args)
    partial.rename(out)
    return out


def _separate_step_counters(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter's `step` its own tensor. DeepSpeed's universal load (0.19.8) stores one
    tensor object for all of them, and torch's Adam increments `step` in place once per parameter
    group that holds it, so each step would count once per group and skew Adam's bias correction."""
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


def load_deepspeed_state(engine, run_dir: str | Path, step: int, ema=None) -> None:
    """Load step `step`'s partitions into `engine` and `ema` (collective).

    On the world size that wrote them DeepSpeed loads its own files; on another one, rank 0 first
    converts the step to DeepSpeed's universal checkpoint, every rank loads its new partitions from
    it, and the EMA is cut again from the full average its files assemble into.
    """
    stage = engine.zero_optimization_stage()
    # Rank 0 reads the metadata for everyone: ranks that saw different files would disagree on the load.
    folder, saved_world = rank0_decides(lambda: check_resumable(run_dir, step, engine.world_size, stage))
    if saved_world == engine.world_size:
        load_path, _ = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=folder.name)
    else:
        universal = rank0_decides(lambda: convert_to_universal(run_dir, step))
        # DeepSpeed reads this flag only while loading (checked with DeepSpeed 0.19.8); it is the
        # `checkpoint.load_universal` config entry, set here because only resuming knows it.
        engine._config.load_universal_checkpoint = True
        try:
            load_path, _ = engine.load_checkpoint(str(universal.parent), tag=universal.name)
        finally:
            engine._config.load_universal_checkpoint = False
        _separate_step_counters(engine.optimizer.optimizer)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder}; see its log above for the reason")
    if ema is not None:
        from fitscale.parallel.deepspeed_ema import load_ema

        all_ranks_agree(lambda: load_ema(ema, folder, engine.global_rank, saved_world))


def read_deepspeed_weights(run_dir: str | Path, step: int, which: str = "model") -> dict[str, torch.Tensor]:
    """Full fp32 weights (`which="model"`) or EMA weights (`"ema"`) of step `step`, in one process.

    The EMA covers the trainable parameters; frozen ones, which it does not average, are the weights'.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = step_dir(run_dir, step)
    if not (folder / METADATA).is_file():
        raise FileNotFoundError(f"{folder} is not a complete DeepSpeed checkpoint of this run")
    weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir(run_dir)), tag=folder.name)
    if which == "ema":
        from fitscale.parallel.deepspeed_ema import assemble_ema, ema_file

        if not ema_file(folder, 0).is_file():
            raise ValueError(f"{folder} holds no EMA weights (was the EMA disabled in that run? drop --ema)")
        world_size = json.loads((folder / METADATA).read_text())["world_size"]
        weights.update(assemble_ema(folder, world_size))
    return weights


def is_deepspeed_checkpoint(checkpoint: str | Path) -> bool:
    """Whether a published `<run_dir>/checkpoints/step-N` folder has its weights in DeepSpeed's files."""
    checkpoint = Path(checkpoint)
    return (checkpoint.parent.parent / SUBFOLDER / checkpoint.name / METADATA).is_file()


def export_deepspeed_weights(run_dir: str | Path, step: int, out: str | Path) -> dict[str, Any]:
    """One safetensors file of step `step`'s full fp32 weights, from the ZeRO-2/3 partitions.

    Runs in one process without a process group; the file loads with `train.init_from`.
    """
    from fitscale.checkpoint.export import save_safetensors

    folder = step_dir(run_dir, step)
    weights = read_deepspeed_weights(run_dir, step)
    info = {"source": str(folder), "step": str(step), "weights": "model", "dtype": "fp32"}
    save_safetensors(weights, Path(out), info, overwrite=False)
    return {**info, "out": str(out), "tensors": len(weights)}
