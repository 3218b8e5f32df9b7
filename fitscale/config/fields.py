"""Every config field with its type, default and description, read from the config dataclasses
themselves (`fitscale config fields`, `fitscale config show`).

A field's description is what its source says next to it, in whichever of the three forms the
sections use: a string literal right after the field (attribute docstring, PEP 257), comment
lines right above it, or a comment at the end of its line. The source is parsed with `ast` and
`tokenize`, so the dataclasses stay plain and the descriptions live in one place.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fitscale.config.run import RunConfig
from fitscale.config.schema import choices
from fitscale.errors import UserError

PRESET_DEFAULT = "<the preset's>"


@dataclass(frozen=True)
class FieldInfo:
    """One config field: dotted path (`train.steps`), type as written, default, description;
    `section` for a nested section (its fields follow it)."""

    path: str
    type: str
    default: Any
    description: str
    section: bool = False


@functools.cache
def field_descriptions(cls: type) -> dict[str, str]:
    """{field name: description} of a dataclass from its source ("" where the source says nothing);
    a class made from another one's fields (`_field_source`, e.g. ModelOverrides) reads that one's."""
    source = textwrap.dedent(inspect.getsource(getattr(cls, "_field_source", cls)))
    lines = source.splitlines()
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    out: dict[str, str] = {}
    for index, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        after = body[index + 1] if index + 1 < len(body) else None
        if (
            isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            text = inspect.cleandoc(after.value.value)
        elif node.end_lineno in comments and lines[node.end_lineno - 1].lstrip()[:1] != "#":
            text = comments[node.end_lineno]
        else:
            above = []
            line = node.lineno - 1
            while line in comments and lines[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            text = " ".join(above)
        out[node.target.id] = " ".join(text.split())
    return out


def _default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None


def _is_section(value: Any) -> bool:
    return isinstance(value, type) and dataclasses.is_dataclass(value)


def describe(cls: type, prefix: str = "") -> list[FieldInfo]:
    """The fields of a config dataclass and of the sections nested in it, depth first, in source order.

    A choice field's type is its allowed values (`fsdp | deepspeed`). The fields of `model.overrides`
    are those of fitscale.models.ModelConfig as written there, with the preset's defaults."""
    from typing import get_type_hints

    source = getattr(cls, "_field_source", cls)
    hints = get_type_hints(source)
    docs = field_descriptions(cls)
    out: list[FieldInfo] = []
    for item in dataclasses.fields(source):
        path = f"{prefix}{item.name}"
        kind = hints.get(item.name)
        if _is_section(kind):
            out.append(
                FieldInfo(path, kind.__name__, None, _class_doc(kind) or docs.get(item.name, ""), True)
            )
            out.extend(describe(kind, f"{path}."))
            continue
        default = PRESET_DEFAULT if source is not cls else _default(item)
        out.append(FieldInfo(path, _type_text(item, kind), default, docs.get(item.name, "")))
    return out


def _type_text(item: dataclasses.Field, kind: Any) -> str:
    """The type as written, or for a choice field its allowed values, e.g. `auto | cpu | cuda`."""

    allowed = choices(kind)
    if allowed is None:
        return str(item.type)
    optional = " | None" if type(None) in getattr(kind, "__args__", ()) else ""
    return " | ".join(str(a) for a in allowed) + optional


def _class_doc(cls: type) -> str:
    return " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())


def describe_run(section: str | None = None) -> list[FieldInfo]:
    """Every field of RunConfig, or of one section (`train`, `optim.ema`, ...). ValueError names
    an unknown section and lists the sections."""

    fields = describe(RunConfig)
    if section is None:
        return fields
    chosen = [f for f in fields if f.path == section or f.path.startswith(f"{section}.")]
    sections = [f.path for f in fields if f.section]
    if not chosen or section not in sections:
        raise UserError(f"config fields: unknown section {section!r}; sections are: {', '.join(sections)}")
    return chosen


def format_fields(fields: list[FieldInfo], width: int = 100) -> str:
    """`path: type = default` then the description, indented and wrapped, for each field."""
    import yaml

    blocks = []
    for info in fields:
        if info.section:
            head = f"{info.path}: section ({info.type})"
        elif info.default == PRESET_DEFAULT:
            head = f"{info.path}: {info.type} = {PRESET_DEFAULT}"
        else:
            head = f"{info.path}: {info.type} = {_flow_yaml(yaml, info.default)}"
        text = textwrap.fill(info.description, width, initial_indent="    ", subsequent_indent="    ")
        blocks.append(head + ("\n" + text if info.description else ""))
    return "\n".join(blocks)


def _flow_yaml(yaml, value: Any) -> str:
    """A value as one line of YAML (what a recipe or `--set` would write)."""
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return text[: -len("...")].strip() if text.endswith("...") else text


def annotated_yaml(config: Any, width: int = 100) -> str:
    """A resolved RunConfig as YAML with each field's description as a comment above it; loading
    the text back (`load_config`) gives the same config."""
    import yaml

    out: list[str] = []

    def emit(obj: Any, indent: int) -> None:
        docs = field_descriptions(type(obj))
        pad = " " * indent
        shown = set(obj) if isinstance(obj, Mapping) else None  # model.overrides: the fields set
        for item in dataclasses.fields(obj):
            if shown is not None and item.name not in shown:
                continue
            value = getattr(obj, item.name)
            section = dataclasses.is_dataclass(value)
            description = (_class_doc(type(value)) if section else "") or docs.get(item.name, "")
            if description:
                out.extend(
                    textwrap.wrap(
                        description,
                        width - indent - 2,
                        initial_indent=f"{pad}# ",
                        subsequent_indent=f"{pad}# ",
                    )
                )
            if section and isinstance(value, Mapping) and not value:
                out.append(f"{pad}{item.name}: {{}}")
            elif section:
                out.append(f"{pad}{item.name}:")
                emit(value, indent + 2)
            else:
                out.append(f"{pad}{item.name}: {_flow_yaml(yaml, value)}")

    emit(config, 0)
    return "\n".join(out) + "\n"
