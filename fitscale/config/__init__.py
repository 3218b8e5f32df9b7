"""The run configuration: one typed tree of sections, loaded from a YAML recipe plus overrides.

`load_config("recipes/demo.yaml", ["train.steps=50"])` merges the recipe and the `--set`
dotlist onto the structured defaults with OmegaConf (which rejects unknown keys and values of
the wrong type), builds the dataclasses (each section checks its own fields), then runs
`RunConfig.validate`, the one place for rules that span sections. Every error names the
field and says what to set instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from fitscale.config.checkpoint import CheckpointConfig
from fitscale.config.data import DataConfig
from fitscale.config.errors import ConfigError
from fitscale.config.launch import LaunchConfig
from fitscale.config.log import LogConfig
from fitscale.config.optim import OptimConfig
from fitscale.config.parallel import ParallelConfig
from fitscale.config.train import FlowConfig, TrainConfig

SECTIONS = ("model", "data", "train", "optim", "parallel", "checkpoint", "log", "launch", "hooks")


@dataclass
class ModelSection:
    """Which network: a preset of `fitscale.models` plus field overrides of its ModelConfig."""

    name: str = "tiny"
    """Preset: tiny, fitv2-b, fitv2-xl, fitv2-3b, fitv2-xl-hr, fitv2-3b-hr."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """ModelConfig fields to change, e.g. {class_dropout_prob: 0.0, attn_backend: reference}."""


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
        """The validated ModelConfig of this run."""
        from fitscale.models.config import build_config

        try:
            return build_config(self.model.name, **dict(self.model.overrides))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model: {error} (set model.name / model.overrides.<field>)") from error

    def validate(self) -> None:
        """Rules that involve more than one section; raises ConfigError naming the field to change."""
        if self.parallel.backend == "deepspeed":
            if self.parallel.sharding == "hybrid":
                raise ConfigError(
                    "parallel.sharding=hybrid is an FSDP mode; with parallel.backend=deepspeed set "
                    "parallel.sharding=full (ZeRO shards over all ranks) or use parallel.backend=fsdp"
                )
            if self.parallel.compile:
                raise ConfigError(
                    "parallel.compile=true is supported with parallel.backend=fsdp only; set parallel.compile=false"
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
        model = self.model_config()
        wrong = [label for label in self.train.sample_labels if not 0 <= label < self.data.num_classes]
        if wrong:
            raise ConfigError(
                f"train.sample_labels: {wrong} outside [0, {self.data.num_classes}) (data.num_classes); "
                "list class indices of the dataset"
            )
        if self.data.num_classes != model.num_classes:
            raise ConfigError(
                f"data.num_classes={self.data.num_classes} but the model has num_classes={model.num_classes}; "
                f"set model.overrides.num_classes={self.data.num_classes} or fix data.num_classes"
            )


def _unknown_key_message(error: Exception) -> str:
    key = getattr(error, "full_key", None) or ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    message = f"unknown config key {key!r}"
    if not parent:
        message += f"; top-level sections are: {', '.join(SECTIONS)}"
    else:
        message += f"; check the spelling against the fields of section {parent!r}"
    return message


def _first_line(error: BaseException) -> str:
    return (getattr(error, "msg", None) or str(error)).strip().splitlines()[0]


# YAML 1.1 reads these as booleans; passed as strings, string fields ("off" modes) keep them and
# boolean fields still parse them as booleans.
_YAML11_WORDS = {"on", "off", "yes", "no", "y", "n"}


def _keep_yaml11_words(item: str) -> str:
    key, value = split_override(item)
    return f"{key}='{value}'" if value.strip().lower() in _YAML11_WORDS else item


def split_override(item: str, form: str = "section.field=value, e.g. train.steps=100") -> tuple[str, str]:
    """`"key=value"` -> `("key", "value")`: split at the first `=`, so a value may contain `=`.

    Raises ConfigError naming the item when it has no `=` or no key; `form` says what it should look like.
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like {form}")
    return key.strip(), value


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a recipe (YAML) and `key=value` overrides onto the defaults and validate the result."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

    base = OmegaConf.structured(RunConfig)
    layers = []
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as error:  # yaml.YAMLError and friends
            raise ConfigError(f"recipe {str(path)!r} is not valid YAML: {error}") from error
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist([_keep_yaml11_words(item) for item in overrides]))
        except OmegaConfBaseException as error:
            raise ConfigError(f"overrides {list(overrides)}: {error}") from error
    try:
        merged = OmegaConf.merge(base, *layers)
    except ConfigKeyError as error:
        raise ConfigError(_unknown_key_message(error)) from error
    except ValidationError as error:
        key = getattr(error, "full_key", "?")
        raise ConfigError(f"{key}: {_first_line(error)}") from error
    if OmegaConf.is_missing(merged, "data"):
        raise ConfigError("data: the recipe has no data section; set data.path to a dataset folder")
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        if isinstance(error.__cause__, ValueError):
            raise ConfigError(_first_line(error.__cause__)) from error
        raise ConfigError(f"{getattr(error, 'full_key', '') or 'config'}: {_first_line(error)}") from error
    except ValueError as error:  # a section's own check, re-raised by OmegaConf with its key appended
        raise ConfigError(_first_line(error)) from error
    config.validate()
    return config


def to_yaml(config: RunConfig) -> str:
    """The resolved config as YAML (what the run folder keeps as config.yaml)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: RunConfig) -> dict[str, Any]:
    """The whole config as nested plain dicts (dataclasses.asdict), e.g. for JSON or wandb."""
    return dataclasses.asdict(config)


__all__ = [
    "ConfigError",
    "HooksSection",
    "FlowConfig",
    "ModelSection",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "load_config",
    "split_override",
    "to_yaml",
]
