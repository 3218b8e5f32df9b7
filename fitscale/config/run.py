"""RunConfig, the typed tree of a run's sections, and `load_config` (a recipe plus `--set` items).

`load_config` reads both with the one loader of config files (fitscale.config.schema), which
rejects unknown keys and values of the wrong type and builds the section dataclasses (each checks
its own fields), then runs `RunConfig.validate`, the one place for rules that span sections.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from fitscale.config.checkpoint import CheckpointConfig
from fitscale.config.data import DataConfig
from fitscale.config.ddpm import check_objective
from fitscale.config.errors import ConfigError
from fitscale.config.launch import LaunchConfig
from fitscale.config.log import LogConfig
from fitscale.config.model import ModelSection
from fitscale.config.optim import OptimConfig
from fitscale.config.parallel import ParallelConfig
from fitscale.config.schema import load_structured
from fitscale.config.train import TrainConfig

SECTIONS = ("model", "data", "train", "optim", "parallel", "checkpoint", "log", "launch", "hooks")


@dataclass
class HooksSection:
    """Steps `fitscale train` runs around the training processes, in the process that starts them:
    importable `module:function` names, each called with the RunConfig (recipes/demo.yaml uses the
    CPU demo's, fitscale.sample.demo)."""

    before: list[str] = field(default_factory=list)
    """Called in order before the ranks start, e.g. to write a dataset."""
    after: list[str] = field(default_factory=list)
    """Called in order once every rank finished, e.g. to draw samples from the final checkpoint."""
    options: dict[str, Any] = field(default_factory=dict)
    """Settings of the hooks, checked by the hooks themselves (fitscale.sample.demo.DemoOptions)."""

    def __post_init__(self) -> None:
        for where in ("before", "after"):
            for name in getattr(self, where):
                module, _, function = str(name).partition(":")
                if not (module and function.isidentifier()):
                    raise ConfigError(
                        f"hooks.{where}: {name!r} is not module:function, e.g. fitscale.sample.demo:prepare_digits"
                    )


@dataclass
class RunConfig:
    """Everything a run needs; saved resolved as `config.yaml` in the run folder."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = MISSING  # no usable default: every run names its dataset
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    hooks: HooksSection = field(default_factory=HooksSection)

    def model_config(self):
        """The validated ModelConfig of this run (ConfigError naming the model field otherwise)."""
        return self.model.config()

    def validate(self) -> None:
        """Rules that involve more than one section; raises ConfigError naming the field to change."""
        parallel = self.parallel
        if parallel.backend == "deepspeed":
            if parallel.sharding == "hybrid" and parallel.zero_stage != 3:
                raise ConfigError(
                    "parallel.sharding=hybrid with parallel.backend=deepspeed is ZeRO++'s hierarchical "
                    f"partitioning (hpZ), a ZeRO-3 feature; parallel.zero_stage={parallel.zero_stage}: set "
                    "parallel.zero_stage=3 or parallel.sharding=full"
                )
            if self.parallel.float8 != "none":
                raise ConfigError(
                    f"parallel.float8={self.parallel.float8} is supported with parallel.backend=fsdp only; "
                    "set parallel.float8=none"
                )
        if self.train.val_every > 0 and self.data.val_path is None:
            raise ConfigError(
                f"train.val_every={self.train.val_every} needs a held-out split: set data.val_path to a "
                "dataset folder written like data.path, or train.val_every=0"
            )
        if self.parallel.compile and not self.data.pad_to_budget:
            raise ConfigError(
                "parallel.compile=true needs static shapes: set data.pad_to_budget=true "
                "or parallel.compile=false"
            )
        if self.train.cuda_graphs and not self.parallel.compile:
            raise ConfigError(
                "train.cuda_graphs=true replays compiled blocks: set parallel.compile=true "
                "(with data.pad_to_budget=true) or train.cuda_graphs=false"
            )
        model = self.model_config()
        wrong = [label for label in self.train.sample_labels if not 0 <= label < self.data.num_classes]
        if wrong:
            raise ConfigError(
                f"train.sample_labels: {wrong} outside [0, {self.data.num_classes}) (data.num_classes); "
                "list class indices of the dataset"
            )
        repa = self.train.repa
        if repa.enabled and not 1 <= repa.block <= model.depth:
            raise ConfigError(
                f"train.repa.block={repa.block} is outside the model's blocks 1..{model.depth}; "
                f"set train.repa.block to one of them"
            )
        check_objective(model.objective, self.train)
        if self.train.sample_every > 0 and self.train.sample_cfg_scale != 1.0 and not model.has_null_class:
            raise ConfigError(
                f"train.sample_cfg_scale={self.train.sample_cfg_scale:g} guides previews with the null class, "
                "but model.class_dropout_prob=0 builds no null-class row: set train.sample_cfg_scale=1 "
                "or model.overrides.class_dropout_prob > 0"
            )
        if self.data.num_classes != model.num_classes:
            raise ConfigError(
                f"data.num_classes={self.data.num_classes} but the model has num_classes={model.num_classes}; "
                f"set model.overrides.num_classes={self.data.num_classes} or fix data.num_classes"
            )


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a recipe (YAML) and `key=value` overrides onto the defaults and validate the result.

    FileNotFoundError names a missing recipe; every other problem is a one-line ConfigError
    (fitscale.config.schema) naming the field, the value and what to set."""
    config = load_structured(
        RunConfig,
        files=[("recipe", recipe)] if recipe is not None else [],
        overrides=list(overrides),
        missing={"data": "the recipe has no data section; set data.path to a dataset folder"},
    )
    config.validate()
    return config


def to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML (what the run folder keeps as config.yaml)."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.structured(config))
    tree["model"]["overrides"] = dict(config.model.overrides)  # only the fields that are set
    return OmegaConf.to_yaml(tree)


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The whole config as nested plain dicts (dataclasses.asdict), e.g. for JSON or wandb."""
    return dataclasses.asdict(config)


__all__ = ["HooksSection", "RunConfig", "load_config", "to_dict", "to_yaml"]
