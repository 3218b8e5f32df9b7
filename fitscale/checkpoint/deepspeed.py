"""DeepSpeed's checkpoint files in a run folder: ZeRO partitions, the EMA's, universal conversion, export.

DeepSpeed writes its own per-rank ZeRO partitions (weights and optimizer state) under
`<run_dir>/deepspeed/step-N`, beside the EMA's partitions (`ema-rank-R.pt`,
fitscale.parallel.deepspeed_ema), with a small `fitscale.json` naming the world size and ZeRO
stage that wrote them, before the CheckpointManager publishes step N (whose DCP part holds the
LR schedule, data position, RNG and progress), so a visible step always has its DeepSpeed part.
Resuming on the same world size loads DeepSpeed's own files and continues bit-identically. On
another world size (same ZeRO stage), rank 0 converts the step once to DeepSpeed's universal
checkpoint (`ds_to_universal`, into `<run_dir>/deepspeed/universal/step-N`), every rank loads
its new partitions with `load_universal`, the EMA is cut again from its assembled files, and the
data position follows the data pipeline's own elastic rule (the DCP part). A ZeRO stage change
is refused before anything is loaded, naming both stages: `fitscale convert export`
consolidates a step's full fp32 weights into one safetensors file, and a new run starts from it
with `train.init_from=FILE` (weights only: the optimizer state, schedule and data position start
afresh). `read_deepspeed_weights` assembles a step's full weights or EMA in one process, for
export and for `train.init_from` of a DeepSpeed checkpoint folder.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from fitscale.checkpoint import layout
from fitscale.errors import UserError
from fitscale.runtime.agree import all_ranks_agree, rank0_decides

log = logging.getLogger(__name__)

SUBFOLDER = "deepspeed"
UNIVERSAL = "universal"  # <run_dir>/deepspeed/universal/step-N: a step converted for another world size
METADATA = "fitscale.json"


class DeepSpeedResumeError(UserError):
    """A DeepSpeed checkpoint cannot be loaded by this run (world size or ZeRO stage differ)."""


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
    a step still being published (asynchronous saving) keeps its part. A folder of `step` that is
    already there belongs to no published checkpoint (a killed save, or a branch abandoned before
    it published): rank 0 removes it first, so no file of another world size or attempt survives
    beside the new ones.
    """
    unpublished = step_dir(run_dir, step)
    if engine.global_rank == 0 and unpublished.exists():
        log.warning("removing %s: DeepSpeed files of a save that was never published", unpublished)
        shutil.rmtree(unpublished)
    if engine.world_size > 1:
        torch.distributed.barrier()
    if ema is not None:  # before DeepSpeed's files, whose save ends in a barrier; the metadata comes last
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


def supersede_deepspeed_steps(run_dir: str | Path, after: int, branch: str) -> list[Path]:
    """Move the DeepSpeed folders of steps after `after` (and their universal conversions) to
    `superseded/<branch>/` beside them, as the CheckpointManager does with their published steps
    when a run resumes from an earlier step (rank 0; layout.supersede). Returns where they went."""

    moved = []
    for folder in (checkpoint_dir(run_dir), checkpoint_dir(run_dir) / UNIVERSAL):
        target, _ = layout.supersede(folder, after, branch)
        if target is not None:
            moved.append(target)
    return moved


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
            f"consolidate the weights with `fitscale convert export {Path(run_dir) / 'checkpoints' / f'step-{step}'} "
            "--out OUT.safetensors` and start a new run with train.init_from=OUT.safetensors (optimizer state and "
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
        if not ema_file(folder, 0).is_file():
            raise UserError(f"{folder} holds no EMA weights (was the EMA disabled in that run? drop --ema)")
        world_size = json.loads((folder / METADATA).read_text())["world_size"]
        weights.update(assemble_ema(folder, world_size))
    return weights


def is_deepspeed_checkpoint(checkpoint: str | Path) -> bool:
    """Whether a published `<run_dir>/checkpoints/step-N` folder has its weights in DeepSpeed's files."""
    checkpoint = Path(checkpoint)
    return (checkpoint.parent.parent / SUBFOLDER / checkpoint.name / METADATA).is_file()


def ema_file(folder: str | Path, rank: int) -> Path:
    """This rank's EMA file in a DeepSpeed checkpoint folder: ema-rank-R.pt."""
    return Path(folder) / f"ema-rank-{rank}.pt"


def save_ema(ema, folder: str | Path, rank: int) -> None:
    """Write this rank's EMA state to `ema_file(folder, rank)`, creating the folder."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(ema.state_dict(), ema_file(folder, rank))


def load_ema(ema, folder: str | Path, rank: int, saved_world_size: int) -> None:
    """This rank's EMA partitions from a step's files; written by another world size, the full
    average is assembled from every rank's file and this rank's fragments are cut from it."""
    file = ema_file(folder, rank if saved_world_size > rank else 0)
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} is missing: the checkpoint was written with optim.ema.enabled=false; "
            "resume with optim.ema.enabled=false or start a new run"
        )
    state = torch.load(file, map_location="cpu", weights_only=False)
    if saved_world_size == ema.fragments.engine.world_size:
        ema.load_state_dict(state)
        return
    ema.relink()
    ema.load_full(assemble_ema(folder, saved_world_size))
    ema.average.num_updates = int(state["num_updates"])


def assemble_ema(folder: str | Path, world_size: int) -> dict[str, torch.Tensor]:
    """Full fp32 EMA weights of the trainable parameters from every rank's file (one process)."""
    full: dict[str, torch.Tensor] = {}
    for rank in range(world_size):
        part = torch.load(ema_file(folder, rank), map_location="cpu", weights_only=False)
        for name, (start, numel, shape) in part["places"].items():
            flat = full.setdefault(name, torch.empty(shape, dtype=torch.float32))
            flat.view(-1)[start : start + numel] = part["params"][name].reshape(-1)[:numel]
    return full
