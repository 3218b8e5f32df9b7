"""Shared test set-up.

Import paths come from pyproject.toml (`[tool.pytest.ini_options] pythonpath`): `tests/` for the
shared `helpers` package (training runs: `helpers.train_runs`, `helpers.train_worker`) and the
independent `reference` package, `tools/` for the benchmarks the tests drive; the SLURM folder's own
`slurm_runs` is importable from its tests as pytest puts that folder first. No test edits sys.path.

Every test leaves the process as it found it (autouse fixtures below): `os.environ` is restored
after each test (a test that sets RANK or WORLD_SIZE in-process would otherwise make every later
in-process `init_distributed` think it is a rank), and a test that leaves a torch.distributed
process group initialised fails at teardown, after the group is destroyed.

Markers (registered in pyproject.toml, `--strict-markers`): `gpu` tests are skipped here when no CUDA
device is visible; `slow` and `slurm` only select lanes (tools/test.sh runs the fast lane
`not slow and not slurm and not gpu` first, then the rest).
"""

from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture(autouse=True)
def restore_environment():
    """Put `os.environ` back as it was before the test (variables added, changed or removed)."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(autouse=True)
def no_process_group_left():
    """Fail a test that leaves the default torch.distributed process group initialised (destroyed
    first, so the next test starts clean); torch is not imported for tests that never imported it."""
    yield
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("the test left a torch.distributed process group initialised; destroy it in the test")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
