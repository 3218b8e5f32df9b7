"""`fitscale data from-images` as a job over ranks: 1 rank and 3 local ranks (`--nproc 3`, each with
a decode worker) write byte-identical datasets, shards and pixels included; the pixels written in
the encoding pass are those `fitscale data pixels --images` writes afterwards."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
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
    options += ["--no-progress", "--pixels"]  # the pixels too are the same whatever the ranks
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


@pytest.mark.parametrize(
    "kind, resolution, sides",
    [("sd", 96, (64, 128)), ("dcae", 128, (128, 192))],  # 16 and 32 pixels per token
)
def test_pixels_written_while_encoding_equal_the_pixels_written_afterwards(
    tmp_path, capsys, kind, resolution, sides
):
    """`from-images --pixels` (parts of 2 images, a decode worker compressing them) against a plain
    `from-images` followed by `fitscale data pixels --images`: the same latents, and the same pixel
    side files byte for byte, crop variants included (images larger than --resolution), for an
    SD-VAE (16 pixels per token) and a DC-AE f32 (32) dataset."""
    images = random_image_folder(tmp_path / "images", per_class=3, sides=sides)
    autoencoder(kind).save_pretrained(tmp_path / "vae")
    common = ["data", "from-images", str(images)]
    options = ["--vae", str(tmp_path / "vae"), "--resolution", str(resolution), "--num-classes", "2"]
    options += ["--part-size", "2"]
    options += ["--no-progress", "--workers", "1"]
    assert main([*common, str(tmp_path / "refused"), *options, "--pixels-codec", "jpeg"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("error: --pixels-codec jpeg: add --pixels to write the pixels with the latents")
    )
    assert not (tmp_path / "refused").exists()
    assert main([*common, str(tmp_path / "same-pass"), *options, "--pixels"]) == 0
    assert main([*common, str(tmp_path / "two-pass"), *options]) == 0
    assert (
        main(
            [
                "data",
                "pixels",
                str(tmp_path / "two-pass"),
                "--images",
                str(images),
                "--resolution",
                str(resolution),
            ]
        )
        == 0
    )
    same_pass, two_pass = files_of(tmp_path / "same-pass"), files_of(tmp_path / "two-pass")
    assert sorted(same_pass) == sorted(two_pass)  # the pixel parts are gone once merged
    pixels = ["pixels.bin", "pixels.npy", "pixels.json"]
    assert [name for name in pixels if same_pass[name] != two_pass[name]] == []
    assert [name for name in same_pass if name.endswith(".mds") and same_pass[name] != two_pass[name]] == []
    index = np.load(tmp_path / "same-pass" / "pixels.npy")
    assert (index[:, 1, 1] > 0).any(), "no crop variant among the pictures"
