"""Lazy re-exports for package `__init__`s, so that importing a package (and `fitscale --help`)
does not import torch.

A package lists what it exports and from which submodule; the submodule is imported on first
attribute access (PEP 562 module `__getattr__`), so `from fitscale.models import build_model`
works as before and `import fitscale.models` stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list]]:
    """`(__getattr__, __dir__)` for `package`, exporting each name from its submodule.

    `exports` maps a public name to the submodule (relative to `package`, e.g. "fit") that defines it,
    or to an absolute module name (starting with "fitscale.") for a name defined in a lower layer.
    An unknown name raises AttributeError like a plain module does.
    """

    def __getattr__(name: str) -> object:
        submodule = exports.get(name)
        if submodule is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = submodule if submodule.startswith("fitscale.") else f"{package}.{submodule}"
        value = getattr(importlib.import_module(module), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
