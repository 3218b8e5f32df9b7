"""Trainable subsets chosen by parameter-name patterns (partial fine-tuning)."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from fitscale.config.errors import ConfigError
from fitscale.errors import UserError
from fitscale.models.official import clean_parameter_name

# The released high-resolution post-training trains these and freezes the rest
# (95.0 M of FiTv2-XL's 671 M parameters).
HIGH_RES_TRAINABLE = (
    "x_embedder.*",
    "global_adaLN_modulation.*",
    "blocks.*.adaLN_modulation.*",
    "final_layer.*",
    "*.bias",
)

NAMED_SETS = {"all": ("*",), "high-res": HIGH_RES_TRAINABLE}


def resolve_patterns(patterns: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """A named set ("all", "high-res") or explicit fnmatch patterns over parameter names."""
    if isinstance(patterns, str):
        if patterns in NAMED_SETS:
            return NAMED_SETS[patterns]
        return (patterns,)
    return tuple(patterns)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether parameter `name` matches any fnmatch pattern of `patterns` (case-sensitive)."""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def trainable_names(model: nn.Module, patterns) -> list[str]:
    """Names of `model`'s parameters selected by `patterns` (a named set or fnmatch patterns), in model
    order.
    """
    patterns = resolve_patterns(patterns)
    return [name for name, _ in model.named_parameters() if matches(name, patterns)]


def apply_trainable(model: nn.Module, patterns) -> int:
    """Set requires_grad by pattern; returns the number of trainable parameters. Fails on a pattern
    that selects nothing, which is almost always a typo; a named set's patterns may select nothing
    (e.g. `global_adaLN_modulation.*` of a model with adaln=normal, which has none)."""
    named = isinstance(patterns, str) and patterns in NAMED_SETS
    patterns = resolve_patterns(patterns)
    names = [name for name, _ in model.named_parameters()]
    for pattern in () if named else patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            raise UserError(
                f"trainable pattern {pattern!r} matches no parameter; names look like {names[:3]}"
            )
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(matches(name, patterns))
        count += param.numel() if param.requires_grad else 0
    return count


def apply_trainable_patterns(model: nn.Module, patterns: list[str]) -> int | None:
    """Freeze the parameters that `train.trainable` does not name; returns the trainable count
    (None when the list is empty and everything trains). A named set ("high-res") stands alone."""

    if not patterns:
        return None
    spec = patterns[0] if len(patterns) == 1 and patterns[0] in NAMED_SETS else patterns
    try:
        return apply_trainable(_unwrapped_names_view(model), spec)
    except ValueError as error:
        raise ConfigError(f"train.trainable: {error}") from error


def _unwrapped_names_view(model: nn.Module) -> nn.Module:
    """`model` itself: FSDP2 and `nn.Module.compile` keep names; checkpoint wrappers are named through."""
    return _CleanNames(model)


class _CleanNames:
    """A view whose `named_parameters` drops activation-checkpoint wrapper prefixes."""

    def __init__(self, model: nn.Module):
        self.model = model

    def named_parameters(self):
        for name, param in self.model.named_parameters():
            yield clean_parameter_name(name), param
