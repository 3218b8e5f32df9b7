"""Trainable subsets chosen by parameter-name patterns (partial fine-tuning)."""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn

from fitscale.errors import UserError

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
