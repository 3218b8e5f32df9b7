"""Load and export the released FiTv2 checkpoints.

fitscale keeps the release's parameter names and layouts (x_embedder.proj, blocks.N.attn.qkv
with its (3, H, d) output layout, ...), so the mapping is the identity on names; what this
module adds is safety: files are read without pickle code execution, wrapper keys that
training scripts add ("module.", "_orig_mod.", {"ema": ...}) are unwrapped, and loading is
strict, naming every missing, unexpected or misshaped key.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fitscale.config.model import ModelConfig
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
        # torch's unpickling message is several lines and suggests weights_only=False (running the file's code)
        text = str(error).strip()
        reason = (
            "" if isinstance(error, pickle.UnpicklingError) or not text else f": {text.splitlines()[0][:120]}"
        )
        raise UserError(
            f"{path} is not a weights file that can be read without running its code ({type(error).__name__}"
            f"{reason}); give a run folder, a step-N checkpoint folder, or a .safetensors / .pt / .bin of "
            "tensors (re-save a trusted one with torch.save(state_dict))"
        ) from None
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


# The release's FiT.__init__ defaults (fit/model/fit_model.py): a key left out of a config takes these.
RELEASE_DEFAULTS: dict[str, Any] = {
    "patch_size": 2, "in_channels": 4, "hidden_size": 1152, "depth": 28, "num_heads": 16, "mlp_ratio": 4.0,
    "class_dropout_prob": 0.1, "num_classes": 1000, "learn_sigma": True, "use_sit": False,
    "use_swiglu": False, "use_swiglu_large": False, "rel_pos_embed": "rope", "norm_type": "layernorm",
    "q_norm": None, "k_norm": None, "qk_norm_weight": False, "qkv_bias": True, "ffn_bias": True,
    "adaln_bias": True, "adaln_type": "normal", "adaln_lora_dim": None, "rope_theta": 10000.0,
    "custom_freqs": "normal", "max_pe_len_h": None, "max_pe_len_w": None, "decouple": False,
    "ori_max_pe_len": None, "online_rope": False, "add_rel_pe_to_v": False, "time_shifting": 1,
}  # fmt: skip
# Keys the release's FiT takes but that do not change the network (training/loading only), and why.
RELEASE_IGNORED = {
    "context_size": "stored by the release, used nowhere in the network",
    "use_checkpoint": "activation checkpointing (train.activation_checkpointing here)",
    "pretrain_ckpt": "weights the release loads at construction (this command converts weights itself)",
    "ignore_keys": "keys skipped when loading pretrain_ckpt",
    "finetune": "which parameters the release trains",
}
# create_norm names (fit/model/norms.py) the release can build; None / "" is its Identity.
RELEASE_NORMS = ("layernorm", "w_layernorm", "w_rmsnorm", "none")


def _release_norm(key: str, value: Any) -> str:
    name = "none" if value in (None, "") else str(value).lower()
    if name not in RELEASE_NORMS:
        why = (
            "raises TypeError there (its RMSNorm takes no include_weight)"
            if name == "rmsnorm"
            else "is unknown"
        )
        raise UserError(
            f"release config: {key}={value!r} {why}; use one of {', '.join(RELEASE_NORMS)} or null"
        )
    return name


def _release_rope(params: Mapping[str, Any]) -> dict[str, Any]:
    method = str(params["custom_freqs"]).lower()
    online = bool(params["online_rope"])
    rope: dict[str, Any] = {"rope_method": method, "rope_decoupled": bool(params["decouple"]),
                            "rope_per_image": online, "rope_theta": float(params["rope_theta"])}  # fmt: skip
    if params["ori_max_pe_len"] is not None:
        rope["rope_base_grid"] = int(params["ori_max_pe_len"])
    if method == "normal":
        return rope  # the release reads no grid for its plain frequencies
    if params["ori_max_pe_len"] is None:
        raise UserError(
            f"release config: custom_freqs={method!r} needs ori_max_pe_len (the release fails without it)"
        )
    if not online:
        rows, cols = params["max_pe_len_h"], params["max_pe_len_w"]
        if rows is None or cols is None:
            raise UserError(
                f"release config: custom_freqs={method!r} without online_rope needs max_pe_len_h and max_pe_len_w "
                "(the release's sample scripts set them to the target grid)"
            )
        rope["rope_target_grid"] = (int(rows), int(cols))
    return rope


def release_model_config(params: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of the network the release's `FiT(**params)` builds (its network_config.params,
    plus the sample scripts' RoPE overrides custom_freqs / max_pe_len_h / max_pe_len_w / decouple /
    ori_max_pe_len / online_rope). Keys left out take the release's defaults (RELEASE_DEFAULTS);
    RELEASE_IGNORED keys and abs_pos_embed=null (the release builds no absolute embedding) are ignored.

    UserError (one line naming the key) for an unknown key or a value the release cannot build
    (e.g. q_norm='rmsnorm', adaln_type='lora' without adaln_lora_dim, learn_sigma with use_sit).
    """
    unknown = [
        k for k in params if k not in RELEASE_DEFAULTS and k not in RELEASE_IGNORED and k != "abs_pos_embed"
    ]
    if unknown:
        raise UserError(f"release config: unknown key {unknown[0]!r} (not an argument of the release's FiT)")
    if params.get("abs_pos_embed") is not None:
        raise UserError(
            f"release config: abs_pos_embed={params['abs_pos_embed']!r} is not supported: the release builds no "
            "absolute embedding (its fit.model.sincos is missing); use null"
        )
    p = {**RELEASE_DEFAULTS, **{k: v for k, v in params.items() if k in RELEASE_DEFAULTS}}
    if p["learn_sigma"] and p["use_sit"]:
        raise UserError(
            "release config: learn_sigma=true with use_sit=true: the release asserts not both; set learn_sigma: false"
        )
    adaln = str(p["adaln_type"])
    if adaln == "lora" and p["adaln_lora_dim"] is None:
        raise UserError(
            "release config: adaln_type='lora' needs adaln_lora_dim (the release's Linear(D, None) fails)"
        )
    rel = p["rel_pos_embed"]
    if rel is not None and str(rel).lower() not in ("rope", "xpos"):
        raise UserError(f"release config: rel_pos_embed={rel!r} is not one of rope, xpos, null")
    fields: dict[str, Any] = {
        "hidden_size": p["hidden_size"], "depth": p["depth"], "num_heads": p["num_heads"],
        "patch_size": p["patch_size"], "in_channels": p["in_channels"], "num_classes": p["num_classes"],
        "class_dropout_prob": float(p["class_dropout_prob"]), "mlp_ratio": float(p["mlp_ratio"]),
        "objective": "flow" if p["use_sit"] else "ddpm", "learn_sigma": bool(p["learn_sigma"]),
        "mlp": ("swiglu_large" if p["use_swiglu_large"] else "swiglu") if p["use_swiglu"] else "gelu",
        "rel_pos_embed": "none" if rel is None else "rope", "rope_on_values": bool(p["add_rel_pe_to_v"]),
        "norm": _release_norm("norm_type", p["norm_type"]), "q_norm": _release_norm("q_norm", p["q_norm"]),
        "k_norm": _release_norm("k_norm", p["k_norm"]), "qk_norm_weight": bool(p["qk_norm_weight"]),
        "qkv_bias": bool(p["qkv_bias"]), "mlp_bias": bool(p["ffn_bias"]), "adaln_bias": bool(p["adaln_bias"]),
        "adaln": adaln, "time_shift": float(p["time_shifting"]), **_release_rope(p),
    }  # fmt: skip
    if p["adaln_lora_dim"] is not None:
        fields["adaln_lora_rank"] = int(p["adaln_lora_dim"])
    try:
        return ModelConfig(**fields)
    except ValueError as error:
        raise UserError(f"release config: {error}") from None


def read_release_config(path: str | Path) -> ModelConfig:
    """`release_model_config` of a release YAML file: a whole config (diffusion.network_config.params,
    as configs/fit*/ hold), a network_config block, or the params alone. UserError naming the file."""
    import yaml  # lazy: heavy

    path = Path(path)
    if not path.is_file():
        raise UserError(f"release config {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    for key in ("diffusion", "network_config"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
    if isinstance(data, dict) and isinstance(data.get("params"), dict):
        target = data.get("target", "fit.model.fit_model.FiT")
        if target != "fit.model.fit_model.FiT":
            raise UserError(f"release config {path}: target {target!r} is not fit.model.fit_model.FiT")
        data = data["params"]
    if not isinstance(data, dict):
        raise UserError(
            f"release config {path}: expected a mapping of FiT arguments, got {type(data).__name__}"
        )
    try:
        return release_model_config(data)
    except UserError as error:
        raise UserError(str(error).replace("release config:", f"release config {path}:", 1)) from None
