"""float8 training of the token linears with torchao (`Float8LinearConfig`, tensorwise or rowwise).

`apply_float8` swaps qualifying `nn.Linear`s for torchao's `Float8Linear` on the meta-device model,
before activation checkpointing, compile and FSDP (torchtitan's order). The weights stay in the
master dtype (fp32 parameters under the same names): only the matmuls cast their operands to
float8 with dynamic scales, so checkpoints and exports do not change with `parallel.float8`.

Which linears convert (torchao 0.18, `torchao.float8._auto_filter_for_recipe`, benchmarked on H100):
- dims (out, in) = (N, K) must both be multiples of 16 (the float8 matmul's requirement);
- tensorwise: skipped when K <= 4096 and N <= 1024;
- rowwise: skipped when N <= 2048, or K <= 1024, or N <= 4096 and K <= 2048.
On top of torchao's filter the model's per-image conditioning linears (the timestep MLP and the
adaLN modulations: one row per image, not per token) and its input/output projections
(`x_embedder`, `final_layer.linear`, as torchtitan keeps its `output` layer) stay in high precision.

At D=1152 (FiTv2-XL) rowwise converts no linear; tensorwise converts the block linears whose
N > 1024 (qkv, proj, fc1_g, fc1_x, fc2). At D=2304 (FiTv2-3B) both convert all five per block.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from fitscale.config.errors import ConfigError
from fitscale.config.parallel import ParallelConfig

log = logging.getLogger(__name__)

# Linears that run on one row per image (modulation, timestep embedding): float8 casts would cost
# more than their matmuls save. Matched as substrings of the module name, as torchao's filter_fqns.
CONDITIONING_FQNS = ("t_embedder", "adaLN_modulation")
# The model's first and last token projections, kept in high precision for accuracy.
BOUNDARY_FQNS = ("x_embedder", "final_layer.linear")

INSTALL_HINT = "pip install 'fitscale[float8]' (torchao) or set parallel.float8=none"


@dataclass
class Float8Report:
    """Which `nn.Linear`s became `Float8Linear` (names) and why each other one did not."""

    recipe: str
    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> reason

    def summary(self) -> str:
        """One paragraph for the run's log: counts, then each reason with the layers it covers."""
        if self.recipe == "none":
            return "float8: off"
        head = f"float8 {self.recipe}: {len(self.converted)} linears converted, {len(self.skipped)} kept"
        if not self.converted:
            head += " (no linear qualifies: every matmul runs in the compute dtype, float8 changes nothing)"
        lines = [head]
        if self.converted:
            lines.append(f"  converted: {collapse_block_names(self.converted)}")
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.skipped.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            lines.append(f"  kept ({reason}): {collapse_block_names(names)}")
        return "\n".join(lines)


def collapse_block_names(names: list[str]) -> str:
    """`blocks.0.attn.qkv, blocks.1.attn.qkv` -> `blocks.*.attn.qkv (x2)`, order of first appearance."""
    counts: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
            name = ".".join(["blocks", "*", *parts[2:]])
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(name if n == 1 else f"{name} (x{n})" for name, n in counts.items())


def float8_linear_config(recipe: str, fsdp_all_gather: bool = False, emulate: bool = False):
    """torchao's `Float8LinearConfig` of the recipe; `emulate` runs the matmuls in high precision
    (float8-rounded operands, any device: CPU tests); `fsdp_all_gather` (tensorwise only) makes FSDP2
    all-gather the float8 weights instead of bf16 ones."""
    try:
        from torchao.float8 import Float8LinearConfig
    except ImportError as error:
        raise ConfigError(f"parallel.float8={recipe} needs torchao: {INSTALL_HINT}") from error
    config = Float8LinearConfig.from_recipe_name(recipe)
    return dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=fsdp_all_gather)


def skip_reason(module: nn.Module, name: str, recipe: str, size_filter: bool = True) -> str | None:
    """Why the linear `name` stays in high precision, or None when it converts (see module docstring)."""
    if any(fqn in name for fqn in CONDITIONING_FQNS):
        return "per-image conditioning, one row per image"
    if any(fqn in name for fqn in BOUNDARY_FQNS):
        return "model input/output projection"
    out_features, in_features = module.weight.shape
    if out_features % 16 or in_features % 16:
        return "dims not multiples of 16"
    if size_filter:
        from torchao.float8 import _auto_filter_for_recipe

        if not _auto_filter_for_recipe(recipe, filter_fqns=[])(module, name):
            return f"below torchao's {recipe} size threshold"
    return None


def apply_float8(
    model: nn.Module, config: ParallelConfig, device: torch.device | None = None
) -> Float8Report:
    """Swap the qualifying linears of `model` for torchao `Float8Linear`s in place; returns the report.

    Call on the model before AC, compile and FSDP. `device` is where the model will run: on a CPU
    the float8 matmuls are emulated (torchao `emulate=True`); a CUDA device must have float8
    matmuls (compute capability 8.9+). Raises ConfigError without torchao or such a GPU.
    """
    recipe = config.float8
    report = Float8Report(recipe)
    if recipe == "none":
        return report
    emulate = device is not None and device.type != "cuda"
    if device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ConfigError(
            f"parallel.float8={recipe}: {torch.cuda.get_device_name(device)} has no float8 matmuls "
            "(compute capability 8.9+, e.g. H100, L40S); set parallel.float8=none"
        )
    linear_config = float8_linear_config(recipe, config.float8_fsdp_all_gather, emulate)
    from torchao.float8 import convert_to_float8_training

    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            reason = skip_reason(module, name, recipe, config.float8_size_filter)
            if reason is None:
                report.converted.append(name)
            else:
                report.skipped[name] = reason
    chosen = set(report.converted)
    convert_to_float8_training(model, config=linear_config, module_filter_fn=lambda _, name: name in chosen)
    if config.float8_fsdp_all_gather:
        model.register_state_dict_post_hook(_plain_state_dict)
    return report


def without_float8_wrapper(tensor: torch.Tensor) -> torch.Tensor:
    """The plain tensor under torchao's `WeightWithDynamicFloat8CastTensor` (the weight of a linear
    with FSDP float8 all-gather), also as the local tensor of a DTensor, sharing its storage; any
    other tensor unchanged. Checkpoints and EMA copies hold plain tensors, so they load without
    torchao and into runs with float8 off."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        local = tensor._local_tensor
        plain = without_float8_wrapper(local)
        if plain is local:
            return tensor
        return DTensor.from_local(
            plain,
            tensor.device_mesh,
            tensor.placements,
            run_check=False,
            shape=tensor.shape,
            stride=tensor.stride(),
        )
    if type(tensor).__name__ == "WeightWithDynamicFloat8CastTensor":
        return tensor._tensor
    return tensor


def _plain_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key, value in state_dict.items():
        if isinstance(value, torch.Tensor):
            state_dict[key] = without_float8_wrapper(value)


def uses_float8_all_gather(config: ParallelConfig, sharded: bool) -> bool:
    """Whether FSDP2 all-gathers float8 weights, whose scales are then precomputed once per step."""
    return sharded and config.float8 == "tensorwise" and config.float8_fsdp_all_gather


def maybe_precompute_float8_scales(model: nn.Module, config: ParallelConfig, sharded: bool) -> bool:
    """After each optimizer step: compute every float8 weight's scale in one all-reduce (torchao's
    `precompute_float8_dynamic_scale_for_fsdp`) when FSDP2 all-gathers float8 weights; returns
    whether it ran. Without it each block would all-reduce its own weights' scales in forward."""
    if not uses_float8_all_gather(config, sharded):
        return False
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

    precompute_float8_dynamic_scale_for_fsdp(model)
    return True
