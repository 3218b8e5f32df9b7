"""`fitscale train RECIPE [--set key=value ...] [--nproc N]`."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a model from a YAML recipe")
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/demo.yaml")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        dest="overrides",
        metavar="KEY=VALUE",
        help="override recipe fields, e.g. --set train.steps=100 optim.lr=2e-4",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="start this many local processes (default: the environment's, or 1)",
    )
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    from fitscale.config import load_config

    config = load_config(args.recipe, args.overrides)  # fail fast, before any process starts
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc and args.nproc > 1 and not launched:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.nproc}",
            "-m",
            "fitscale.cli",
            "train",
            args.recipe,
            "--set",
            *args.overrides,
        ]
        return subprocess.call(command)
    from fitscale.train.trainer import Trainer

    Trainer(config).train()
    return 0
