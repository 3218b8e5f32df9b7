"""The model section of a run: a preset of fitscale.models plus typed overrides of its fields.

`model.overrides` has one field per `ModelConfig` field, of the same type (a tuple becomes a
list, as YAML writes it), so a recipe or `--set model.overrides.depth=abc` is checked like every
other section. An override left at null keeps the preset's value. The fields, their types and
descriptions are read from ModelConfig itself (fitscale/models/config.py), the one definition.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from fitscale.config.errors import ConfigError
from fitscale.config.schema import check_choices
from fitscale.models.config import PRESETS, ModelConfig, build_config

PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  # the names of fitscale.models PRESETS


def _override_type(kind: Any) -> Any:
    """`Optional[kind]`, with `tuple[int, int]` read as `list[int]` (what YAML and OmegaConf hold)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        kind = args[0]
    if typing.get_origin(kind) is tuple:
        kind = list[typing.get_args(kind)[0]]
    return Optional[kind]  # noqa: UP045 (a runtime type object, not an annotation)


class _SetFields(Mapping):
    """Read as a mapping of the fields that are set (not None), so `build_config(name, **overrides)`
    and `dict(overrides)` see only the changes."""

    def _set(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def __getitem__(self, key: str) -> Any:
        return self._set()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._set())

    def __len__(self) -> int:
        return len(self._set())

    def __post_init__(self) -> None:
        check_choices(self, "model.overrides.")

    def __repr__(self) -> str:
        return f"ModelOverrides({', '.join(f'{k}={v!r}' for k, v in self.items())})"


ModelOverrides = dataclass(repr=False)(
    types.new_class(
        "ModelOverrides",
        (_SetFields,),
        exec_body=lambda ns: ns.update(
            __module__=__name__,
            __doc__="ModelConfig fields that differ from the preset's; null keeps the preset's value.",
            __annotations__={
                name: _override_type(kind) for name, kind in typing.get_type_hints(ModelConfig).items()
            },
            **{f.name: field(default=None, metadata=f.metadata) for f in dataclasses.fields(ModelConfig)},
            _field_source=ModelConfig,  # where fitscale.config.fields reads each field's description
        ),
    )
)


@dataclass
class ModelSection:
    """Which network: a preset of `fitscale.models` plus overrides of its ModelConfig fields."""

    name: PresetName = "tiny"
    """Preset of fitscale/models/config.py `PRESETS` that the overrides change."""
    overrides: ModelOverrides = field(default_factory=ModelOverrides)
    """ModelConfig fields to change, e.g. {class_dropout_prob: 0.0, attn_backend: reference}."""

    def __post_init__(self) -> None:
        check_choices(self, "model.")

    def config(self) -> ModelConfig:
        """The validated ModelConfig: the preset with the overrides that are set; ConfigError naming
        the field otherwise."""
        try:
            return build_config(self.name, **self.overrides)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model: {error} (set model.name / model.overrides.<field>)") from error
