"""Shared test set-up.

Import paths come from pyproject.toml (`[tool.pytest.ini_options] pythonpath`): `tests/` for the
independent `reference` package and `tools/` for the benchmarks the tests drive; a test folder's own
helpers (`train_runs`, `slurm_runs`) are importable from its tests as pytest puts that folder first.

Markers (registered in pyproject.toml, `--strict-markers`): `gpu` tests are skipped here when no CUDA
device is visible; `slow` and `slurm` only select lanes (tools/test.sh runs the fast lane
`not slow and not slurm and not gpu` first, then the rest).
"""

from __future__ import annotations

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
