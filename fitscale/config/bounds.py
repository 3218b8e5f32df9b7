"""Declared bounds of numeric config fields: `field(default=..., metadata=bound(...))`, checked in one
place (`fitscale.config.schema.check_choices`, with the Literal choices) when a section is built.

The message is the one every bound of the config has: `<field>: must be <rule>[ (<meaning>)], got
<value>[; <note>]`, e.g. `train.grad_clip: must be >= 0 (0 disables clipping), got -1`. A value of
None passes (an Optional field's "unset"); NaN fails every bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bound:
    """low <= value (low < value when `low_open`), value <= high (value < high when `high_open`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    meaning: str = ""  # what a boundary value means, shown in parentheses: "0 disables clipping"
    note: str = ""  # after the value: "the paper uses 1e-4"
    template: str = (
        ""  # a section's own wording, e.g. "{path}={value!r}: must be at least 1"; "" the common one
    )

    def holds(self, value: Any) -> bool:
        """Whether `value` lies within the bound (None always does; NaN never)."""
        if value is None:
            return True
        if isinstance(value, float) and math.isnan(value):
            return False
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or bool(value < self.high if self.high_open else value <= self.high)

    def rule(self) -> str:
        """`>= 1`, `> 0`, `in [0, 1)`: the bound as the message writes it."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"

    def message(self, path: str, value: Any) -> str:
        """The one-line error for `value` of the field at dotted `path`."""
        if self.template:
            return self.template.format(path=path, value=value)
        meaning = f" ({self.meaning})" if self.meaning else ""
        note = f"; {self.note}" if self.note else ""
        return f"{path}: must be {self.rule()}{meaning}, got {value}{note}"


def _number(value: float | None) -> str:
    return str(int(value)) if value is not None and float(value).is_integer() else str(value)


def bound(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    meaning: str = "",
    note: str = "",
    template: str = "",
) -> dict[str, Bound]:
    """Field metadata declaring the bound: `field(default=1, metadata=bound(1))` for `>= 1`."""
    return {"bound": Bound(low, high, low_open, high_open, meaning, note, template)}
