"""The one loader of typed config files and the one error format of every config problem.

Recipes with `--set` overrides (`RunConfig`), sweep specs (`SweepSpec`) and cluster profiles
(`ClusterProfile`) are all read by `load_structured`: YAML files and `key=value` items merged in
order onto the dataclass with OmegaConf, which rejects unknown keys and values of the wrong type,
then built into the dataclasses, whose `__post_init__` checks each value on its own.

Every problem is a `ConfigError` with one line, `[<source>: ]<field>: <problem>; <what to do>`:
the source (`sweep spec 'x.yaml'`, `cluster profile 'y.yaml'`) where the field alone does not say
which file it is in, the dotted field, the value and the fix. A choice field is typed as a
`typing.Literal`, the one definition of its allowed values: OmegaConf checks it when a file is
read and `check_choices` when a dataclass is built in Python, with the same message,
`<field>: <value> is not one of <allowed>`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from fitscale.config.errors import ConfigError

T = TypeVar("T")

# YAML 1.1 reads these as booleans; passed as strings, string fields ("off" modes) keep them and
# boolean fields still parse them as booleans.
_YAML11_WORDS = {"on", "off", "yes", "no", "y", "n"}


def choices(kind: Any) -> tuple[Any, ...] | None:
    """The allowed values of a `Literal[...]` type (also inside `Optional`), else None."""
    if typing.get_origin(kind) is Literal:
        return typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        for arg in typing.get_args(kind):
            found = choices(arg)
            if found is not None:
                return found
    return None


def choice_message(field: str, value: Any, allowed: Sequence[Any], hint: str = "") -> str:
    """`<field>: <value> is not one of <allowed>[; <hint>]`, the line of every bad choice."""
    message = f"{field}: {value!r} is not one of {', '.join(str(a) for a in allowed)}"
    return f"{message}; {hint}" if hint else message


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_choices(obj: Any, prefix: str) -> None:
    """ConfigError for the first field of dataclass `obj` whose value is not allowed: a `Literal`
    field's value that is not one of its choices, or a value outside the field's declared bound
    (`metadata=bound(...)`, fitscale.config.bounds). The one place both are checked.

    `prefix` is the section's dotted path with its dot (`parallel.`); a choice field's
    `metadata["hint"]` is appended to the message. None passes for an `Optional` field."""
    hints = _hints(type(obj))
    for item in dataclasses.fields(obj):
        allowed = choices(hints[item.name])
        value = getattr(obj, item.name)
        declared = item.metadata.get("bound")
        if declared is not None and not declared.holds(value):
            raise ConfigError(declared.message(f"{prefix}{item.name}", value))
        if allowed is None or value in allowed or (value is None and type(None) in _union(hints[item.name])):
            continue
        raise ConfigError(
            choice_message(f"{prefix}{item.name}", value, allowed, item.metadata.get("hint", ""))
        )


def _union(kind: Any) -> tuple[Any, ...]:
    return typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else ()


def split_override(item: str, form: str = "section.field=value, e.g. train.steps=100") -> tuple[str, str]:
    """`"key=value"` -> `("key", "value")`: split at the first `=`, so a value may contain `=`.

    Raises ConfigError naming the item when it has no `=` or no key; `form` says what it should look like.
    """
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like {form}")
    return key.strip(), value


def _keep_yaml11_words(item: str, form: str) -> str:
    key, value = split_override(item, form)
    return f"{key}='{value}'" if value.strip().lower() in _YAML11_WORDS else item


def load_structured(
    schema: type[T],
    *,
    files: Sequence[tuple[str, str | Path]] = (),
    overrides: Sequence[str] = (),
    values: Mapping[str, Any] | None = None,
    source: str = "",
    missing: Mapping[str, str] | None = None,
    form: str = "section.field=value, e.g. train.steps=100",
) -> T:
    """Dataclass `schema` built from `values`, then YAML `files`, then `key=value` `overrides`.

    `files` are (what the file is, path) pairs, e.g. ("recipe", "recipes/demo.yaml"); each must
    exist (FileNotFoundError) and hold a YAML mapping. `source` prefixes every error line (the
    file the fields are in, where the dotted field alone does not say it). `missing` gives the line
    for a required field the layers leave unset ({field: "what to set"}); others get a generic one.
    `form` is what an override should look like. Every other problem raises ConfigError in the
    module's one format.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{source}: {message}" if source else message)

    layers = [OmegaConf.create(dict(values))] if values else []
    for kind, file in files:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"{kind} {str(path)!r} does not exist")
        try:
            layer = OmegaConf.load(path)
        except Exception as error:  # yaml.YAMLError and friends
            raise ConfigError(f"{kind} {str(path)!r} is not valid YAML: {_first_line(error)}") from error
        if not OmegaConf.is_dict(layer):
            raise ConfigError(f"{kind} {str(path)!r} must be a mapping of fields, e.g. `name: value`")
        layers.append(layer)
    if overrides:
        items = [_keep_yaml11_words(item, form) for item in overrides]
        try:
            layers.append(OmegaConf.from_dotlist(items))
        except OmegaConfBaseException as error:
            raise ConfigError(f"overrides {list(overrides)}: {_first_line(error)}") from error
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
    except OmegaConfBaseException as error:
        key, error = _locate(schema, layers, error)
        raise fail(_merge_message(schema, error, key)) from None
    absent = sorted(OmegaConf.missing_keys(merged))
    if absent:
        known = missing or {}
        raise fail(
            next((f"{key}: {known[key]}" for key in absent if key in known), None)
            or f"{', '.join(absent)}: missing; set {'it' if len(absent) == 1 else 'them'}"
        )
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        cause = error.__cause__
        if isinstance(cause, ValueError):  # a dataclass's own check (ConfigError is one)
            raise fail(_first_line(cause)) from None
        raise fail(f"{getattr(error, 'full_key', '') or 'config'}: {_first_line(error)}") from None
    except ValueError as error:  # a dataclass's own check, raised outside OmegaConf's wrapping
        raise fail(_first_line(error)) from None


def _locate(schema: type, layers: list, error: Exception, prefix: str = "") -> tuple[str, Exception]:
    """The full dotted key of a merge error and the error itself. OmegaConf names a key inside an
    item of a list of dataclasses relative to that item, so each item is merged alone to find it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for item in dataclasses.fields(schema):
        kind = _hints(schema)[item.name]
        element = _element(kind)
        if not (isinstance(element, type) and dataclasses.is_dataclass(element)):
            continue
        for layer in layers:
            value = layer.get(item.name) if OmegaConf.is_dict(layer) else None
            if OmegaConf.is_list(value):
                entries = [(f"{prefix}{item.name}[{i}]", entry) for i, entry in enumerate(value)]
            elif OmegaConf.is_dict(value) and typing.get_origin(_union_free(kind)) is not dict:
                entries = [(f"{prefix}{item.name}", value)]
            else:
                continue
            for path, entry in entries:
                try:
                    OmegaConf.merge(OmegaConf.structured(element), entry)
                except OmegaConfBaseException as inner:
                    return _locate(element, [entry], inner, f"{path}.")
    return prefix + (getattr(error, "full_key", None) or ""), error


def _union_free(kind: Any) -> Any:
    args = [a for a in _union(kind) if a is not type(None)]
    return args[0] if len(args) == 1 else kind


def _merge_message(schema: type, error: Exception, key: str) -> str:
    """The one-format line of an OmegaConf merge error: unknown key, bad choice or wrong type."""
    from omegaconf.errors import ConfigKeyError

    parent = _parent(key)
    if isinstance(error, ConfigKeyError):
        if not parent:
            hints = _hints(schema)
            kinds = "sections" if all(_is_dataclass(_element(hints[n])) for n in hints) else "fields"
            return f"unknown config key {key!r}; top-level {kinds} are: {', '.join(_field_names(schema))}"
        names = _field_names(field_type(schema, parent))
        message = f"unknown config key {key!r}; check the spelling against the fields of section {parent!r}"
        return f"{message}: {', '.join(names)}" if names else message
    kind = field_type(schema, key)
    value = getattr(error, "value", None)
    allowed = choices(kind)
    if allowed is not None and value is not None:
        return choice_message(key, value, allowed, _hint(schema, key))
    if value is not None and (expected := _expected(kind)) is not None:
        return f"{key}: {value!r} is not {expected}"
    return f"{key or 'config'}: {_first_line(error)}"


def _parent(key: str) -> str:
    return re.sub(r"\[\d+\]$", "", key.rsplit(".", 1)[0]) if "." in key else ""


def _expected(kind: Any) -> str | None:
    names = {int: "an integer", float: "a number", bool: "true or false"}
    for arg in (kind, *_union(kind)):
        if arg in names:
            return names[arg]
    return None


def field_type(schema: Any, key: str) -> Any:
    """The annotated type of dotted `key` (`optim.ema.decay`, `models[0].preset`) in dataclass
    `schema`, looking through Optional, list and dict values; None where the path leaves it."""
    kind = schema
    for part in filter(None, re.split(r"\.|\[\d+\]", key)):
        kind = _element(kind)
        if not (isinstance(kind, type) and dataclasses.is_dataclass(kind)):
            return None
        kind = _hints(kind).get(part)
    return _element(kind) if re.search(r"\[\d+\]$", key) else kind


def _hint(schema: Any, key: str) -> str:
    """`metadata["hint"]` of the dataclass field at dotted `key`, else ""."""
    owner = field_type(schema, _parent(key)) if _parent(key) else schema
    owner = _element(owner)
    name = re.split(r"\.|\[", key)[-1] if "." in key else key
    if _is_dataclass(owner):
        for item in dataclasses.fields(owner):
            if item.name == name:
                return item.metadata.get("hint", "")
    return ""


def _element(kind: Any) -> Any:
    """`X` of `Optional[X]`, `list[X]` and `dict[K, X]`; `kind` otherwise."""
    args = [a for a in _union(kind) if a is not type(None)]
    if len(args) == 1:
        kind = args[0]
    if typing.get_origin(kind) in (list, dict):
        return typing.get_args(kind)[-1]
    return kind


def _is_dataclass(kind: Any) -> bool:
    return isinstance(kind, type) and dataclasses.is_dataclass(kind)


def _field_names(section: Any) -> list[str]:
    section = _element(section)
    if _is_dataclass(section):
        return [f.name for f in dataclasses.fields(section)]
    return []


def _first_line(error: BaseException) -> str:
    text = (getattr(error, "msg", None) or str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__
