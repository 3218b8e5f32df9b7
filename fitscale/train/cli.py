"""`fitscale train RECIPE [--set key=value ...] [--nproc N]`.

Without a launcher around it (no RANK / SLURM_PROCID in the environment) this process is the
parent: it checks the recipe and everything else that needs no process group (the backend's
package, the world size against the batch, the datasets, the run folder's lock), runs the
recipe's `hooks.before` steps, starts `--nproc` processes (default: the recipe's
`launch.tasks_per_node`, else 1) with fitscale.launch.local, and once they finish runs its
`hooks.after` steps and prints where the results are. A failing run prints one line, the first
failing rank's error, with the exit status one process would give (fitscale.launch.failures);
the other ranks' output is in `<run_dir>/logs/`. Under torchrun or SLURM every rank trains
with the environment as given."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

PARENT_ENV = "FITSCALE_TRAIN_PARENT"  # set for the ranks this process starts


def register(subparsers) -> None:
    """Add `fitscale train` and its options to `subparsers`."""
    from fitscale.cli import add_set_option

    parser = subparsers.add_parser("train", help="train a model from a YAML recipe")
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/demo.yaml")
    add_set_option(parser, "recipe fields", "train.steps=100 optim.lr=2e-4")
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="start this many local processes (default: the recipe's launch.tasks_per_node, or 1)",
    )
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """`fitscale train`: load the recipe (errors before any process starts), run the `hooks.before`
    steps, start `--nproc` local ranks (or train in this process; as one rank when launched by
    torchrun or SLURM), then the `hooks.after` steps; exit status 0. ValueError for --nproc < 1.
    """
    from fitscale.cli import set_option_args
    from fitscale.config import load_config
    from fitscale.config.checkpoint import INTERRUPTED_STATUS

    config = load_config(args.recipe, args.overrides)  # fail fast, before any process starts
    launched = "RANK" in os.environ or "SLURM_PROCID" in os.environ
    if args.nproc is not None and args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if launched:
        from fitscale.launch.env import leave_process_group
        from fitscale.train.trainer import Trainer

        trainer = Trainer(config)
        step = trainer.train()
        leave_process_group()
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
        if trainer.stopped_by == "SIGINT":  # saved and stopped early: the status of a Ctrl-C
            return INTERRUPTED_STATUS
        if rank == 0 and PARENT_ENV not in os.environ:  # else the parent reports, after its closing steps
            print(summary_line(config, step))
        return 0
    nproc = args.nproc or config.launch.tasks_per_node or 1
    check_before_launch(config, nproc)
    before = [resolve_hook("before", name) for name in config.hooks.before]
    after = [resolve_hook("after", name) for name in config.hooks.after]  # found now, not after training
    for hook in before:
        hook(config)
    check_data_before_launch(config)  # after the hooks, which may write the dataset
    if nproc > 1:
        from fitscale.launch.failures import WorkerFailed, run_ranks
        from fitscale.launch.local import python_module_command

        command = python_module_command(
            "fitscale.cli", "train", args.recipe, *set_option_args(args.overrides)
        )
        try:
            run_ranks(command, nproc, config.train.run_dir, env={PARENT_ENV: "1"})
        except WorkerFailed as error:
            if error.code == INTERRUPTED_STATUS:  # Ctrl-C: rank 0 said what was saved (or lost)
                return INTERRUPTED_STATUS
            raise
    else:
        from fitscale.train.trainer import Trainer

        trainer = Trainer(config)
        trainer.train()
        if trainer.stopped_by == "SIGINT":
            return INTERRUPTED_STATUS
    for hook in after:
        hook(config)
    print(summary_line(config, None))
    return 0


def check_before_launch(config, world_size: int, lock: bool = True) -> None:
    """Catch what would otherwise fail in every rank after start-up, before any process starts:
    the backend's package, a world size that does not divide the batch, a trainable pattern that
    matches nothing (checked on a meta-device model), a validation split that is not there, (with
    `lock`) a run folder held by a live run, and a resume that changes a field that may not change."""
    import torch

    from fitscale.config.errors import ConfigError
    from fitscale.data.format import META_FILE
    from fitscale.launch.launcher import world_size_problems
    from fitscale.models import build_model
    from fitscale.train.resume import check_before_start
    from fitscale.train.state import RunLock
    from fitscale.train.trainer import apply_trainable_patterns

    problems = world_size_problems(config, world_size, f"{world_size} process(es)")
    if problems:
        raise ConfigError("; ".join(problems))
    with torch.device("meta"):
        model = build_model(config.model.name, **dict(config.model.overrides))
    apply_trainable_patterns(model, list(config.train.trainable))
    data = config.data
    if (
        config.train.val_every > 0
        and data.val_remote is None
        and not (Path(data.val_path) / META_FILE).is_file()
    ):
        raise ConfigError(
            f"data.val_path={data.val_path} holds no dataset (no {META_FILE}); write the held-out split with "
            f"`fitscale data ...` or set train.val_every=0"
        )
    if lock:
        with RunLock(config.train.run_dir):  # RunFolderInUseError if a live run holds it
            pass
    check_before_start(config)  # a resume that changes a field that may not change


def check_data_before_launch(config) -> None:
    """The training set must be there (unless it streams from `data.remote`) and hold latents of the
    recipe's shape (fitscale.train.dataset_shape): ConfigError otherwise."""
    from fitscale.config.errors import ConfigError
    from fitscale.data.format import META_FILE

    data = config.data
    if data.remote is None and not (Path(data.path) / META_FILE).is_file():
        raise ConfigError(
            f"data.path={data.path} holds no dataset (no {META_FILE}); write one with `fitscale data ...` "
            "or point data.path at a dataset folder"
        )
    from fitscale.data.remote import check_remote
    from fitscale.train.dataset_shape import follow_training_dataset

    for field, remote in (("data.remote", data.remote), ("data.val_remote", data.val_remote)):
        if remote is not None:
            try:
                check_remote(remote, field)  # endpoint, bucket, credentials: before any rank starts
            except ValueError as error:
                raise ConfigError(str(error)) from None
    follow_training_dataset(config)  # a recipe whose latent shape is not the dataset's: refused here


def resolve_hook(where: str, name: str):
    """The function a `hooks.before` / `hooks.after` entry (`module:function`) names; ValueError
    naming the entry when it cannot be imported."""
    import importlib

    module_name, _, function = name.partition(":")
    try:
        return getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"hooks.{where}: {name!r} cannot be found ({error})") from error


def summary_line(config, step: int | None) -> str:
    """One line naming the step reached, the checkpoint this run wrote last and the metrics file.

    `step` is the trainer's (None in the parent of local ranks: then the live branch of
    metrics.jsonl says it). A run that wrote no checkpoint says `no checkpoint written`, also when
    it resumed from one; without a metrics file the newest complete checkpoint stands in.
    """
    from fitscale.checkpoint.layout import complete_steps, step_dirname
    from fitscale.train.records import METRICS_FILE, last_attempt, read_records

    run_dir = Path(config.train.run_dir)
    metrics = run_dir / METRICS_FILE
    if metrics.is_file():
        logged, written = last_attempt(read_records(metrics))
    else:
        folder = run_dir / config.checkpoint.folder
        steps = complete_steps(folder) if folder.is_dir() else []
        logged, written = (steps[-1], str(folder / step_dirname(steps[-1]))) if steps else (None, None)
    reached = step if step is not None else logged
    checkpoint = f"checkpoint: {written}" if written else "no checkpoint written"
    return (
        f"fitscale train: done at step {reached if reached is not None else '?'}; {checkpoint}; "
        f"metrics: {metrics if metrics.is_file() else 'none written'}"
    )
