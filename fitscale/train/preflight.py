"""Every check made before any rank starts: can this config run on W ranks here?

`fitscale train` (fitscale/train/cli.py) and `fitscale launch` (fitscale/launch/launcher.py) ask the
same questions here, once, before starting a process: the backend's own conditions (its package,
`ParallelBackend.launch_problems`), a world size that does not divide the batch or the shard groups,
a trainable pattern that matches nothing, datasets that are not there, a run folder held by a live
run, and a resume that changes a field that may not change. Each problem is a ConfigError naming
the field and the fix; nothing here needs a process group.
"""

from __future__ import annotations

from pathlib import Path

from fitscale.config.errors import ConfigError
from fitscale.data.format import META_FILE
from fitscale.data.remote import check_remote
from fitscale.train.dataset_shape import follow_training_dataset
from fitscale.train.resume import check_before_start


def world_size_problems(config, world: int, shape: str, tasks_per_node: int | None = None) -> list[str]:
    """Reasons this run cannot split over `world` ranks (`shape` says how they are laid out)."""
    from fitscale.parallel.backend import BACKENDS  # lazy: heavy

    problems = BACKENDS[config.parallel.backend].launch_problems(config)
    data = config.data
    if data.batch_mode == "images" and data.global_batch_size % world:
        problems.append(
            f"data.global_batch_size={data.global_batch_size} does not divide over {world} ranks "
            f"({shape}); set it to a multiple of {world}"
        )
    parallel = config.parallel
    if parallel.sharding == "hybrid":
        shard = parallel.shard_size or tasks_per_node or world
        if world % shard:
            problems.append(
                f"parallel.shard_size={shard} does not divide the {world} ranks; set parallel.shard_size "
                f"to a divisor of {world} (0 = the ranks of one node)"
            )
    return problems


def check_before_launch(config, world_size: int, lock: bool = True) -> None:
    """Catch what would otherwise fail in every rank after start-up, before any process starts:
    the backend's package, a world size that does not divide the batch, a trainable pattern that
    matches nothing (checked on a meta-device model), a validation split that is not there, (with
    `lock`) a run folder held by a live run, and a resume that changes a field that may not change."""
    import torch

    from fitscale.models import build_model  # lazy: heavy
    from fitscale.models.partial import apply_trainable_patterns  # lazy: heavy
    from fitscale.train.state import RunLock  # lazy: heavy

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

    data = config.data
    if data.remote is None and not (Path(data.path) / META_FILE).is_file():
        raise ConfigError(
            f"data.path={data.path} holds no dataset (no {META_FILE}); write one with `fitscale data ...` "
            "or point data.path at a dataset folder"
        )

    for field, remote in (("data.remote", data.remote), ("data.val_remote", data.val_remote)):
        if remote is not None:
            try:
                check_remote(remote, field)  # endpoint, bucket, credentials: before any rank starts
            except ValueError as error:
                raise ConfigError(str(error)) from None
    follow_training_dataset(config)  # a recipe whose latent shape is not the dataset's: refused here
