"""`fitscale data from-images` as a job over ranks: 1 rank and 3 local ranks (`--nproc 3`, each with
a decode worker) write byte-identical datasets, shards included."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers.images import autoencoder, files_of, random_image_folder

from fitscale.cli import main

pytestmark = pytest.mark.slow


def test_one_rank_and_three_ranks_write_identical_datasets(tmp_path):
    random_image_folder(tmp_path / "images", per_class=7)
    (tmp_path / "images" / "b" / "broken.png").write_bytes(b"not a png")
    autoencoder("sd").save_pretrained(tmp_path / "vae")
    common = [sys.executable, "-m", "fitscale.cli", "data", "from-images", str(tmp_path / "images")]
    options = ["--vae", str(tmp_path / "vae"), "--resolution", "64", "--num-classes", "2", "--part-size", "3"]
    options += ["--no-progress"]
    assert main([*common[3:], str(tmp_path / "one"), *options, "--workers", "0"]) == 0  # in this process
    three = subprocess.run(
        [*common, str(tmp_path / "three"), *options, "--nproc", "3", "--workers", "1"],
        capture_output=True,
        text=True,
    )
    assert three.returncode == 0, three.stderr
    written, split = files_of(tmp_path / "one"), files_of(tmp_path / "three")
    assert sorted(written) == sorted(split) and any(name.endswith(".mds") for name in written)
    assert [name for name in written if written[name] != split[name]] == []
