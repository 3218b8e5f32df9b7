"""Load and export the released FiTv2 checkpoints.

fitscale keeps the release's parameter names and layouts (x_embedder.proj, blocks.N.attn.qkv
with its (3, H, d) output layout, ...), so the mapping is the identity on names; what this
module adds is safety: files are read without pickle code execution, wrapper keys that
training scripts add ("module.", "_orig_mod.", {"ema": ...}) are unwrapped, and loading is
strict, naming every missing, unexpected or misshaped key.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fitscale.errors import UserError

# Module-name segments that wrappers insert anywhere in parameter names: activation checkpointing,
# torch.compile (`_orig_mod`) and FSDP1; DDP and DeepSpeed engines add a leading "module.".
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")
OUTER_WRAPPER = "module"
# Top-level keys under which training scripts store the weights inside a checkpoint dict.
CONTAINER_KEYS = ("ema", "model", "state_dict", "module")


def read_checkpoint_file(path: str | Path, container_key: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors, .bin or .pt file, read without executing pickled code.

    `container_key` picks e.g. "ema" or "model" from a training checkpoint; by default the first
    of ema, model, state_dict, module that holds a dict is used (the release ships EMA weights).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # the unpickler refuses anything but tensors and plain containers
        raise UserError(
            f"{path} could not be read as a weights-only checkpoint ({type(error).__name__}: {error}); "
            "convert it to .safetensors or re-save it with torch.save(state_dict)"
        ) from error
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a {type(obj).__name__}, expected a dict of tensors")
    keys = (container_key,) if container_key else CONTAINER_KEYS
    for key in keys:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    else:
        if container_key:
            raise KeyError(f"{path} has no {container_key!r} entry; top-level keys: {sorted(obj)[:10]}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path} holds no tensors at its top level; top-level keys: {sorted(obj)[:10]}")
    return tensors


def clean_parameter_name(name: str) -> str:
    """A parameter's name without what wrappers add, the name fitscale saves and matches patterns on.

    `module._orig_mod.blocks.0._checkpoint_wrapped_module.attn.qkv.weight` -> `blocks.0.attn.qkv.weight`:
    every segment of `WRAPPER_SEGMENTS`, then every leading `module`, dropped; so a checkpoint or a
    trainable pattern does not depend on how the model was wrapped.
    """
    parts = [part for part in name.split(".") if part not in WRAPPER_SEGMENTS]
    while len(parts) > 1 and parts[0] == OUTER_WRAPPER:
        parts = parts[1:]
    return ".".join(parts)


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with the keys that wrappers add removed (`clean_parameter_name` of every key:
    "module.", "_orig_mod.", FSDP1 and activation-checkpoint segments, at any depth). Tensors are not
    copied.
    """
    return {clean_parameter_name(key): value for key, value in state_dict.items()}


def load_official_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy released weights (release names) into `model`, strictly, casting to the model's dtype."""
    incoming = strip_wrapper_prefixes(state_dict)
    expected = {name: param for name, param in model.state_dict().items()}
    missing = sorted(set(expected) - set(incoming))
    unexpected = sorted(set(incoming) - set(expected))
    misshaped = [
        f"{name}: checkpoint {tuple(incoming[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in sorted(set(expected) & set(incoming))
        if tuple(incoming[name].shape) != tuple(expected[name].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(
            f"unexpected keys: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}"
        )
    if misshaped:
        problems.append(f"shape mismatches: {'; '.join(misshaped[:8])}")
    if not missing and not unexpected and len(misshaped) == 1:
        label_rows_advice(incoming, expected)
    if problems:
        raise UserError(
            "checkpoint does not match the model (check the preset, depth and num_classes): "
            + " | ".join(problems)
        )
    model.load_state_dict(incoming, strict=True)


LABEL_TABLE = "y_embedder.embedding_table.weight"


def label_rows_advice(incoming: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """UserError naming the fix when the one shape that differs is the label table, by one row: the
    null-class row, which the release adds only when class_dropout_prob > 0 (and `null_class=true`
    keeps at 0). Returns when the difference is anything else."""
    if LABEL_TABLE not in incoming or LABEL_TABLE not in expected:
        return
    (have, width), (want, model_width) = incoming[LABEL_TABLE].shape, expected[LABEL_TABLE].shape
    if width != model_width or abs(have - want) != 1:
        return
    if have < want:
        raise UserError(
            f"the checkpoint's label table ({LABEL_TABLE}) has {have} rows and the model's {want}: it was saved "
            "without a null-class row (class_dropout_prob=0); build the model with class_dropout_prob=0 "
            "(`--set class_dropout_prob=0`, or model.overrides.class_dropout_prob=0 in a run config)"
        )
    raise UserError(
        f"the checkpoint's label table ({LABEL_TABLE}) has {have} rows and the model's {want}: it holds a "
        "null-class row this model (class_dropout_prob=0) leaves out; keep it with null_class=true "
        "(`--set null_class=true`, or model.overrides.null_class=true in a run config)"
    )


def export_official_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under the release's names, as contiguous CPU tensors."""
    exported = {}
    for name, tensor in strip_wrapper_prefixes(model.state_dict()).items():
        if hasattr(tensor, "full_tensor"):  # a DTensor shard: gather the whole parameter
            tensor = tensor.full_tensor()
        tensor = tensor.detach().to("cpu")
        exported[name] = (tensor.to(dtype) if dtype is not None else tensor).contiguous().clone()
    return exported


def load_official_checkpoint(model: nn.Module, path: str | Path, container_key: str | None = None) -> None:
    """Load a released (or exported) FiTv2 file into `model`, strictly (`read_checkpoint_file`, then
    `load_official_state_dict`).

    `container_key` picks e.g. "ema" from a training checkpoint. Raises FileNotFoundError for a
    missing file and ValueError for an unreadable one or one whose keys or shapes do not match.
    """
    load_official_state_dict(model, read_checkpoint_file(path, container_key))
