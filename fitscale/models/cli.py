"""`fitscale info MODEL`: size, compute and memory of a preset, from its own shapes."""

from __future__ import annotations

import argparse
import json

from fitscale.errors import UserError


def register(subparsers) -> None:
    """Add the `fitscale info` subcommand to the top-level parser's `subparsers`."""
    from fitscale.clitools import add_set_option

    parser = subparsers.add_parser(
        "info",
        help="parameters, FLOPs per token and per image, memory of a model preset",
        description="Parameters, FLOPs (2 per multiply-add, attention included) and training memory of a preset.",
    )
    parser.add_argument(
        "model", help="preset name: tiny, fitv2-b, fitv2-xl, fitv2-3b, fitv2-xl-hr, fitv2-3b-hr"
    )
    parser.add_argument(
        "--seq-len", type=int, default=256, help="tokens per image for the FLOP figures (256)"
    )
    parser.add_argument(
        "--trainable",
        default=None,
        help="trainable set: 'all', 'high-res' (the released post-training set) or a name pattern; "
        "default: high-res for *-hr presets, else all",
    )
    add_set_option(parser, "model fields", "depth=4 hidden_size=256")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run_info)


def parse_overrides(pairs: list[str]) -> dict:
    """`--set` items for ModelConfig fields -> {field: value} of the fields they set, read and typed by
    the one config loader (fitscale.config.model.ModelOverrides); ConfigError names a malformed item,
    an unknown field or a value of the wrong type."""
    from fitscale.config.model import ModelOverrides
    from fitscale.config.schema import load_structured

    return dict(load_structured(ModelOverrides, overrides=list(pairs), form="field=value, e.g. depth=4"))


def model_info(name: str, seq_len: int = 256, trainable: str | None = None, **overrides) -> dict:
    """Size, compute and memory of preset `name` (with model-field `overrides`), built on the meta device.

    A dict: resolved config, parameter counts (all and `trainable`: "all", "high-res" or a name
    pattern; "high-res" by default for *-hr presets), FLOPs per token and per image at `seq_len` tokens
    per image (2 FLOPs per multiply-add, attention included; training = 3x forward), the papers'
    "GFLOPs" at 256 tokens, and training-state bytes before sharding (fitscale.models.flops).
    Raises ValueError for a non-positive `seq_len`, an unknown preset or field, or a trainable
    pattern that matches no parameter.
    """
    import torch

    from fitscale.models import build_model
    from fitscale.models.flops import forward_flops, paper_gflops, training_memory_bytes
    from fitscale.models.partial import apply_trainable

    if seq_len <= 0:
        raise UserError(f"--seq-len must be positive, got {seq_len}")
    with torch.device("meta"):
        model = build_model(name, **overrides)
    config = model.config
    trainable = trainable or ("high-res" if name.endswith("-hr") else "all")
    num_params = sum(p.numel() for p in model.parameters())
    num_trainable = apply_trainable(model, trainable)
    image_flops = forward_flops(config, [seq_len])
    return {
        "model": name,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
        "parameters": num_params,
        "trainable_set": trainable,
        "trainable_parameters": num_trainable,
        "seq_len": seq_len,
        "forward_flops_per_token": image_flops / seq_len,
        "training_flops_per_token": 3 * image_flops / seq_len,
        "forward_flops_per_image": image_flops,
        "paper_gflops_256": round(paper_gflops(config, 256), 2),
        "memory_bytes": training_memory_bytes(num_params, num_trainable),
    }


def format_info(info: dict) -> str:
    """The human-readable table of a `model_info` dict (GFLOPs in 1e9 FLOPs, memory in GiB)."""
    gib = 1024**3
    mem = info["memory_bytes"]
    lines = [
        f"model                      {info['model']}",
        f"parameters                 {info['parameters']:,}",
        f"trainable ({info['trainable_set']})".ljust(27) + f"{info['trainable_parameters']:,}",
        f"forward FLOPs / token      {info['forward_flops_per_token'] / 1e9:.3f} G  (at {info['seq_len']} tokens/image)",
        f"training FLOPs / token     {info['training_flops_per_token'] / 1e9:.3f} G",
        f"forward FLOPs / image      {info['forward_flops_per_image'] / 1e9:.1f} G",
        f"paper 'GFLOPs' (256 tok)   {info['paper_gflops_256']}",
        f"weights fp32 / bf16        {mem['weights_fp32'] / gib:.2f} / {mem['weights_bf16'] / gib:.2f} GiB",
        f"grads fp32                 {mem['grads_fp32'] / gib:.2f} GiB",
        f"AdamW state fp32           {mem['adamw_state_fp32'] / gib:.2f} GiB",
        f"training state total       {mem['total_fp32_training'] / gib:.2f} GiB (before sharding, no activations)",
    ]
    return "\n".join(lines)


def run_info(args: argparse.Namespace) -> int:
    """`fitscale info`: print `model_info` as a table or JSON (`--json`); returns exit status 0."""
    info = model_info(args.model, args.seq_len, args.trainable, **parse_overrides(args.overrides))
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
