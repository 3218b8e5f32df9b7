"""The real one-host SLURM cluster the tests in this folder run on.

The session fixture starts the cluster with `cluster/local_slurm.sh start` (installing Debian's
slurm-wlm and munge on first use) and skips the SLURM tests only when SLURM cannot be installed
here (no root, no apt-get); a cluster that installs but does not start is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_runs import REPO, SCRIPT


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    if shutil.which("apt-get") is None and shutil.which("slurmctld") is None:
        pytest.skip("SLURM cannot be installed here: no apt-get and no slurmctld on PATH")
    if os.geteuid() != 0 and shutil.which("slurmctld") is None:
        pytest.skip("SLURM cannot be installed here: installing slurm-wlm needs root")
    install = subprocess.run(["bash", str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
    if install.returncode != 0:
        pytest.skip(f"SLURM cannot be installed here: {install.stderr.strip().splitlines()[-1:]}")
    start = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
    assert start.returncode == 0, f"cluster/local_slurm.sh start failed:\n{start.stderr}"


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "synth"
    subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "data", "synth", str(path), "--num-images", "128",
         "--num-classes", "10", "--no-progress"],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    return path
