"""Single-file weights from a sharded checkpoint, and released checkpoints in fitscale's names.

Export runs offline in one process: DCP's metadata gives every saved tensor's global shape, so
full-size tensors are allocated for just the weights wanted (`model.*` or the EMA's
`ema.params.*`) and `dcp.load(no_dist=True)` assembles them from however many ranks wrote the
shards. Optimizer state is never read. Loading happens in groups of about 1 GiB, each cast to the
output dtype before the next, so a bf16 export of a 3B model needs about 6 GiB of memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from fitscale.checkpoint import layout
from fitscale.checkpoint.deepspeed import is_deepspeed_checkpoint, read_deepspeed_weights
from fitscale.config.model import PRESETS, ModelConfig
from fitscale.diskspace import named_out_of_space
from fitscale.errors import UserError
from fitscale.models import build_model
from fitscale.models.official import (
    export_official_state_dict,
    load_official_state_dict,
    read_checkpoint_file,
    read_release_config,
    strip_wrapper_prefixes,
)

WEIGHT_PREFIXES = {"model": "model.", "ema": "ema.params."}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GROUP_BYTES = 1 << 30


TRAINING_ONLY_PREFIXES = ("hidden_head.",)  # REPA's projector (fitscale.flow.repa): trains, never exported


def read_run_weights(checkpoint: Path, which: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`read_weights`, or for a DeepSpeed run the weights (and EMA) of its ZeRO partitions; the
    training-only heads (`TRAINING_ONLY_PREFIXES`) are left out: they are no part of the network."""

    if not is_deepspeed_checkpoint(checkpoint):
        weights = read_weights(checkpoint, which, dtype)
    else:
        step = layout.read_metadata(checkpoint)["step"]
        weights = read_deepspeed_weights(checkpoint.parent.parent, step, which)
    return {
        name: tensor.to(dtype)
        for name, tensor in weights.items()
        if not name.startswith(TRAINING_ONLY_PREFIXES)
    }


def read_weights(
    checkpoint: Path, which: str = "model", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Full (unsharded) weights of a checkpoint folder, keyed by parameter name."""
    prefix = WEIGHT_PREFIXES[which]
    metadata = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    wanted = {
        key: entry
        for key, entry in metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    if not wanted:
        top = sorted({key.split(".", 1)[0] for key in metadata})
        hint = " (was the EMA disabled in that run? drop --ema)" if which == "ema" else ""
        raise UserError(
            f"checkpoint {checkpoint} holds no {which} weights{hint}; its entries: {', '.join(top)}"
        )
    weights: dict[str, torch.Tensor] = {}
    for group in _groups(wanted):
        template = {
            key: torch.empty(entry.size, dtype=entry.properties.dtype) for key, entry in group.items()
        }
        with layout.single_process_quiet():
            dcp.load(template, storage_reader=FileSystemReader(checkpoint), no_dist=True)
        for key, tensor in template.items():
            weights[key[len(prefix) :]] = tensor.to(dtype) if dtype is not None else tensor
    return weights


def load_dcp_weights(
    model: torch.nn.Module,
    checkpoint: Path,
    ema: bool = True,
    raw_hint: str = "pass --raw to use the raw weights",
) -> None:
    """Copy a checkpoint's EMA (`ema.params.*`) or raw (`model.*`) weights into a materialised
    model, on one process; the optimizer state is never read. Raises UserError naming the
    checkpoint when those entries are missing; for the EMA it ends with `raw_hint`, how the caller
    asks for the raw weights instead."""
    weights = {name: tensor for name, tensor in model.state_dict().items()}
    state = {"ema": {"params": weights}} if ema else {"model": weights}
    try:
        with layout.single_process_quiet():
            dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    except (Exception, CheckpointException) as error:  # DCP wraps a missing key in CheckpointException
        which = "EMA weights (key `ema`)" if ema else "weights (key `model`)"
        hint = f"; {raw_hint}" if ema else ""
        reason = layout.first_failure(error).splitlines()[0][:300]
        raise UserError(f"{checkpoint} has no usable {which}: {reason}{hint}") from None


def _groups(entries: dict[str, TensorStorageMetadata]) -> list[dict[str, TensorStorageMetadata]]:
    groups, current, size = [], {}, 0
    for key, entry in entries.items():
        nbytes = entry.size.numel() * entry.properties.dtype.itemsize
        if current and size + nbytes > GROUP_BYTES:
            groups.append(current)
            current, size = {}, 0
        current[key] = entry
        size += nbytes
    return [*groups, current] if current else groups


def model_section(checkpoint: Path) -> dict[str, Any] | None:
    """The run's `model` section ({name, overrides}): from the checkpoint's metadata or the run's config.yaml."""
    metadata = layout.read_metadata(checkpoint)
    if isinstance(metadata.get("model"), dict):
        return metadata["model"]
    config_file = checkpoint.parent.parent / "config.yaml"
    if config_file.is_file():
        import yaml

        section = (yaml.safe_load(config_file.read_text()) or {}).get("model")
        if isinstance(section, dict) and "name" in section:
            return section
    return None


def build_cpu_model(name: str, overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """A model of preset `name` with uninitialised CPU weights (about to be overwritten)."""

    with torch.device("meta"):
        model = build_model(name, **dict(overrides or {}))
    return model.to_empty(device="cpu")


def save_safetensors(
    tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str], overwrite: bool
) -> None:
    """Write `out` via a temporary file and a rename: an existing file is replaced only on success.
    A full disk or quota raises OutOfSpaceError naming `out`, the bytes and the fix; the partial
    file is removed."""
    from safetensors.torch import save_file

    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    needed = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    fix = (
        "free space there or write the file to another filesystem; an existing file of that name is untouched"
    )
    try:
        with named_out_of_space(out, "the weights file", fix, needed):  # one line, not a Rust traceback
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial), metadata=metadata)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, out)


def export_checkpoint(
    source: str | Path,
    out: str | Path,
    *,
    ema: bool = False,
    dtype: str = "fp32",
    names: str = "fitscale",
    model: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`fitscale convert export`: one safetensors file from a run, its checkpoint folder or a step-N folder."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if names not in ("fitscale", "official"):
        raise UserError(f"--names {names!r} is not `fitscale` or `official`")
    checkpoint = layout.find_checkpoint(source)
    which = "ema" if ema else "model"
    weights = read_run_weights(checkpoint, which, DTYPES[dtype])
    if names == "official":
        section = {"name": model, "overrides": {}} if model else model_section(checkpoint)
        if section is None:
            raise UserError(
                f"--names official needs the model preset: {checkpoint} has no run config.yaml beside it; "
                "pass --model PRESET"
            )
        network = build_cpu_model(section["name"], section.get("overrides"))
        try:
            network.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise UserError(
                f"the {which} weights of {checkpoint} do not fit model {section['name']!r}: {str(error).splitlines()[0]}"
            ) from None
        weights = export_official_state_dict(network, DTYPES[dtype])
    step = layout.read_metadata(checkpoint)["step"]
    info = {"source": str(checkpoint), "step": str(step), "weights": which, "names": names, "dtype": dtype}
    save_safetensors(weights, Path(out), info, overwrite)
    return {
        **info,
        "out": str(out),
        "tensors": len(weights),
        "parameters": sum(t.numel() for t in weights.values()),
    }


def width_and_depth(state_dict: dict[str, torch.Tensor]) -> tuple[int | None, int]:
    """A checkpoint's hidden size (None without a patch embedder) and number of blocks."""
    width = state_dict["x_embedder.proj.weight"].shape[0] if "x_embedder.proj.weight" in state_dict else None
    return width, len({key.split(".")[1] for key in state_dict if key.startswith("blocks.")})


def matching_presets(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """The presets whose width and depth match a checkpoint's (release or fitscale names), in
    definition order; a `-hr` preset has its base's shapes (only its RoPE differs), so both match."""

    width, depth = width_and_depth(state_dict)
    return [name for name, config in PRESETS.items() if config.hidden_size == width and config.depth == depth]


def infer_preset(state_dict: dict[str, torch.Tensor]) -> str:
    """The released preset whose width and depth match a checkpoint (FiTv2 B / XL / 3B, FiT v1 B / XL;
    the base preset, not its `-hr` twin: the weights are the same network). UserError when none does."""

    for name in matching_presets(state_dict):
        if not name.endswith("-hr"):
            return name
    width, depth = width_and_depth(state_dict)
    raise UserError(
        f"no preset has hidden size {width} and depth {depth}; pass --model PRESET (and check the file is FiT v1 or FiTv2)"
    )


def convert_official(
    source: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
    release_config: str | Path | None = None,
) -> dict[str, Any]:
    """`fitscale convert official-to-fitscale`: a released checkpoint as a safetensors file in our names.

    The weights pass through a real model (strict loading), so a wrong preset or a damaged file is
    caught here rather than at the start of a training run. `release_config` (the release's YAML,
    `read_release_config`) gives the network instead of a preset: the nearest preset (or `model`)
    with the differing fields as overrides, written to the file's metadata (`overrides`, JSON).
    """

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    overrides: dict[str, Any] = {}
    if release_config is not None:
        model, overrides = preset_and_overrides(read_release_config(release_config), model)
    released = strip_wrapper_prefixes(read_checkpoint_file(source))
    name = model or infer_preset(released)
    network = build_cpu_model(name, overrides)
    load_official_state_dict(network, released)
    weights = {k: v.detach().to(DTYPES[dtype]) for k, v in network.state_dict().items()}
    info = {"source": str(source), "model": name, "names": "fitscale", "dtype": dtype}
    if overrides:
        info["overrides"] = json.dumps(overrides)
    save_safetensors(weights, Path(out), info, overwrite)
    return {
        **info,
        "out": str(out),
        "tensors": len(weights),
        "parameters": sum(t.numel() for t in weights.values()),
    }


def preset_and_overrides(config: ModelConfig, preset: str | None = None) -> tuple[str, dict[str, Any]]:
    """(`preset`, or the preset differing from `config` in the fewest fields; those fields -> values),
    so that build_model(name, **overrides) builds `config` (YAML/JSON-ready: tuples become lists)."""

    def differences(name: str) -> dict[str, Any]:
        base = dataclasses.asdict(PRESETS[name])
        return {k: v for k, v in dataclasses.asdict(config).items() if base[k] != v}

    name = preset or min(PRESETS, key=lambda n: len(differences(n)))
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    return name, {k: list(v) if isinstance(v, tuple) else v for k, v in differences(name).items()}


def read_run_start(path: str | Path, which: str = "model") -> dict[str, torch.Tensor] | None:
    """Full fp32 weights (`which="model"`) or EMA (`"ema"`; None when that run kept none) of a
    checkpoint of either backend, for `train.init_from` of a run folder, its `checkpoints` folder or
    a step-N folder (the newest complete step of a folder). One process; FileNotFoundError naming
    the path when it holds no complete checkpoint."""
    checkpoint = layout.find_checkpoint(path)
    try:
        return read_run_weights(checkpoint, which, torch.float32)
    except ValueError:
        if which == "ema":  # that run kept no EMA: this one's starts from the weights, as usual
            return None
        raise
