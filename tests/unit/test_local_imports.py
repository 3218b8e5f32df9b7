"""tools/check_local_imports.py: which function-level imports of fitscale modules it lets through."""

from __future__ import annotations

from pathlib import Path

import check_local_imports as check

_SOURCE = '''
"""A module of a throwaway package."""

from fitscale.config import load_config  # top level: never reported


def plain():
    from fitscale.train.trainer import Trainer

    return Trainer


def reasoned():
    from fitscale.models import build_model  # lazy: heavy

    return build_model


def spread():
    from fitscale.data.vae import (  # lazy: optional extra
        encode,
    )

    return encode


def excused_badly():
    from . import sibling  # lazy: cycle

    return sibling


def other_package():
    import json

    return json
'''


def _tree(tmp_path: Path) -> list[check.LocalImport]:
    package = tmp_path / "fitscale" / "area"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "user.py").write_text(_SOURCE)
    return check.function_level_imports(tmp_path)


def test_finds_function_level_fitscale_imports_with_their_reasons(tmp_path):
    found = _tree(tmp_path)
    assert [(item.line, item.target, item.reason) for item in found] == [
        (8, "fitscale.train.trainer", None),
        (14, "fitscale.models", "heavy"),
        (20, "fitscale.data.vae", "optional extra"),
        (28, "fitscale.area", "cycle"),  # relative, resolved against the module's package
    ]
    assert {item.module for item in found} == {"fitscale.area.user"}


def test_verdicts(tmp_path):
    plain, heavy, extra, cycle = _tree(tmp_path)
    assert check.verdict(plain, allowed=set()) == (
        "fitscale/area/user.py:8: function-level import of fitscale.train.trainer in fitscale.area.user, "
        "which `fitscale --help` does not load: move it to the top of the module, or end the line with a "
        "reason (# lazy: heavy, # lazy: optional extra)"
    )
    assert check.verdict(plain, allowed={"fitscale.area.user"}) is None  # a module --help loads
    assert check.verdict(heavy, allowed=set()) is None
    assert check.verdict(extra, allowed=set()) is None
    assert check.verdict(cycle, allowed={"fitscale.area.user"}) == (
        "fitscale/area/user.py:28: function-level import of fitscale.area gives the reason "
        "'# lazy: cycle', which is not one of 'heavy', 'optional extra' (a cycle is fixed by moving "
        "code, not by a lazy import)"
    )


def test_dispatcher_modules_are_what_help_loads():
    allowed = check.dispatcher_modules(Path(__file__).resolve().parents[2])
    assert {"fitscale.cli", "fitscale.lazy", "fitscale.train.cli", "fitscale.launch.cli"} <= allowed
    assert not {"fitscale.train.trainer", "fitscale.launch.job", "fitscale.parallel.backend"} & allowed
