"""`fitscale convert export|official-to-fitscale`: weights in and out of fitscale as single files."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add `fitscale convert` with its actions `export` and `official-to-fitscale` to `subparsers`."""
    parser = subparsers.add_parser(
        "convert",
        help="export checkpoint weights to safetensors, or import released FiTv2 weights",
        description="Convert weights between sharded fitscale checkpoints, single files and the release's format.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    export = actions.add_parser(
        "export",
        help="one safetensors file from a DCP checkpoint (weights or EMA, bf16 or fp32)",
        description="Write the weights of a sharded checkpoint to one safetensors file, offline, in one process.",
    )
    export.add_argument(
        "source", metavar="RUN_OR_CKPT", help="a run folder (newest checkpoint) or a step-N folder"
    )
    export.add_argument("--out", required=True, help="output .safetensors file")
    export.add_argument(
        "--ema", action="store_true", help="export the EMA weights instead of the raw weights"
    )
    export.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32", help="output dtype (fp32)")
    export.add_argument(
        "--names",
        choices=("fitscale", "official"),
        default="fitscale",
        help="parameter names: fitscale's or the released checkpoints' (fitscale)",
    )
    export.add_argument(
        "--model",
        default=None,
        help="preset of the run, for --names official when the run has no config.yaml",
    )
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    export.add_argument("--json", action="store_true", help="print the result as JSON")
    export.set_defaults(func=run_export)

    official = actions.add_parser(
        "official-to-fitscale",
        help="a released FiTv2 checkpoint (.safetensors/.bin/.pt) as a safetensors file in fitscale's names",
        description="Load released FiTv2 weights strictly into a fitscale model and save them as safetensors "
        "(usable as train.init_from or for sampling).",
    )
    official.add_argument("input", metavar="IN", help="released checkpoint file")
    official.add_argument("output", metavar="OUT", help="output .safetensors file")
    official.add_argument("--model", default=None, help="preset (default: inferred from the weights' shapes)")
    official.add_argument(
        "--release-config",
        metavar="PATH.yaml",
        default=None,
        help="the release's config (e.g. configs/fit/config_fit_xl.yaml): its network_config gives the model",
    )
    official.add_argument("--dtype", choices=("bf16", "fp32"), default="fp32", help="output dtype (fp32)")
    official.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    official.add_argument("--json", action="store_true", help="print the result as JSON")
    official.set_defaults(func=run_official_to_fitscale)


def _report(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
    else:
        print(f"wrote {result['out']}: {result['tensors']} tensors, {result['parameters']:,} parameters")
        if result.get("overrides"):  # a release config that is no preset: how to build its network again
            values = json.loads(result["overrides"]).items()
            sets = " ".join(
                f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}" for k, v in values
            )
            print(f"model {result['model']} with --set {sets} (fitscale sample; model.overrides.* in a run)")


def run_export(args: argparse.Namespace) -> int:
    """`fitscale convert export`: one safetensors file from a run's newest (or a given) checkpoint; exit
    status 0.
    """
    from fitscale.checkpoint.export import export_checkpoint

    result = export_checkpoint(
        args.source,
        args.out,
        ema=args.ema,
        dtype=args.dtype,
        names=args.names,
        model=args.model,
        overwrite=args.overwrite,
    )
    _report(result, args.json)
    return 0


def run_official_to_fitscale(args: argparse.Namespace) -> int:
    """`fitscale convert official-to-fitscale`: a released FiTv2 file checked against a preset and
    rewritten as safetensors; exit 0.
    """
    from fitscale.checkpoint.export import convert_official

    config = args.release_config
    options = dict(model=args.model, dtype=args.dtype, overwrite=args.overwrite, release_config=config)
    result = convert_official(args.input, args.output, **options)
    _report(result, args.json)
    return 0
