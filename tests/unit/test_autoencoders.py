"""Every autoencoder class end to end: a small random-weight AutoencoderKL with 4 channels (SD / SD-XL),
one with 16 channels and a shift (FLUX), and an AutoencoderDC at 32x with 32 channels (DC-AE f32c32),
each saved with `save_pretrained` and loaded from its folder as a user's local copy would be.
From each: `fitscale data from-images`, a few training steps of the tiny model (whose in_channels
and patch_size follow the dataset), and pictures sampled back through the same autoencoder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.images import autoencoder
from PIL import Image

from fitscale.cli import main

# kind -> (latent channels, patch size, pixels per token)
KINDS = {"sd": (4, 2, 16), "flux": (16, 2, 16), "dcae": (32, 1, 32)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir()
        for i, (height, width) in enumerate([(160, 192), (192, 128)]):
            pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def encode(images, root, kind: str) -> tuple:
    autoencoder(kind).save_pretrained(root / kind)
    data = root / f"data-{kind}"
    args = ["data", "from-images", images, data, "--vae", root / kind, "--resolution", 192]
    assert main([str(a) for a in [*args, "--num-classes", 2, "--no-progress", "--dtype", "float32"]]) == 0
    return root / kind, data


def train_args(data, run, *extra: str) -> list[str]:
    sets = [
        f"data.path={data}",
        f"train.run_dir={run}",
        "data.num_classes=2",
        "model.overrides.num_classes=2",
        "model.overrides.attn_backend=reference",
        "data.global_batch_size=4",
        "data.num_workers=0",
        "train.steps=2",
        "checkpoint.interval=2",
        "checkpoint.async_save=false",
        "launch.tasks_per_node=1",
        "parallel.sharding=none",
        *extra,
    ]
    return ["train", "recipes/demo.yaml", "--set", *sets]


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_dataset_of_each_autoencoder_trains_and_samples_back_through_it(images, tmp_path, kind, capsys):
    vae, data = encode(images, tmp_path, kind)
    channels, patch, step = KINDS[kind]
    meta = json.loads((data / "fitscale.json").read_text())
    assert (meta["latent_channels"], meta["patch_size"], meta["token_dim"]) == (
        channels,
        patch,
        patch**2 * channels,
    )
    assert meta["vae"]["class"] == ("AutoencoderDC" if kind == "dcae" else "AutoencoderKL")
    assert meta["num_samples"] == 4
    rows = np.load(data / "samples.npy")[:, :2]
    assert sorted(map(tuple, rows.tolist())) == sorted(
        [(160 // step, 192 // step), (192 // step, 128 // step)] * 2
    )
    run = tmp_path / "run"
    hooks = ["hooks.before=[]", "hooks.after=[]"]
    assert main(train_args(data, run, *hooks)) == 0
    import yaml

    overrides = yaml.safe_load((run / "config.yaml").read_text())["model"]["overrides"]
    # the model took the dataset's latent shape where the preset's (SD's: 4 channels, p = 2) differs
    assert overrides.get("in_channels", 4) == channels and overrides.get("patch_size", 2) == patch
    out = tmp_path / "samples"
    sample = ["sample", str(run), "--out", str(out), "--vae", str(vae), "--height", str(2 * step)]
    sample += ["--width", str(3 * step), "--num-per-size", "1", "--steps", "2", "--device", "cpu", "--raw"]
    assert main(sample) == 0
    (picture,) = (np.asarray(Image.open(p)) for p in (out / "images").glob("*.png"))
    assert picture.shape == (2 * step, 3 * step, 3)


@pytest.fixture(scope="module")
def dcae(images, tmp_path_factory):
    return encode(images, tmp_path_factory.mktemp("dcae"), "dcae")


def test_a_recipe_of_another_latent_shape_than_the_dataset_is_refused_in_one_line(dcae, tmp_path, capsys):
    _, data = dcae
    capsys.readouterr()
    assert main(train_args(data, tmp_path / "run", "model.overrides.in_channels=4", "hooks.after=[]")) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert (
        f"model.overrides.in_channels=4 but the dataset data.path={data} holds latents with latent_channels=32; "
        "remove model.overrides.in_channels" in lines[0]
    )
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused before any rank starts


def test_sampling_a_dcae_dataset_with_another_autoencoder_is_refused_in_one_line(dcae, tmp_path, capsys):
    from fitscale.data.vae import check_vae_matches_dataset

    vae, data = dcae
    autoencoder("flux").save_pretrained(tmp_path / "flux")
    with pytest.raises(ValueError) as refused:
        check_vae_matches_dataset(tmp_path / "flux", data)
    assert str(refused.value) == (
        f"--vae {tmp_path / 'flux'} is an AutoencoderKL with 16 channels at 8x, but the model was trained on "
        f"{data}, encoded by {vae}, an AutoencoderDC with 32 channels at 32x; decode with that autoencoder"
    )
    check_vae_matches_dataset(vae, data)  # its own autoencoder is accepted


def test_an_autoencoder_folder_without_its_config_is_refused_in_one_line(dcae, images, tmp_path, capsys):
    vae, _ = dcae
    (tmp_path / "copy").mkdir()
    for weights in vae.glob("*.safetensors"):
        (tmp_path / "copy" / weights.name).write_bytes(weights.read_bytes())
    capsys.readouterr()
    args = ["data", "from-images", str(images), str(tmp_path / "out"), "--vae", str(tmp_path / "copy")]
    assert main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(
        f"--vae {tmp_path / 'copy'}: no config.json in the folder; expected a diffusers autoencoder "
        "saved with save_pretrained (config.json and its weights)"
    )
    assert not (tmp_path / "out").exists()


def test_dcae_encodes_256_pixels_into_64_tokens(dcae):
    """DC-AE f32 with patch size 1: 8 x 8 tokens for 256 x 256 (SD-VAE: 16 x 16)."""
    from fitscale.data.vae import check_vae_folder, vae_downsample, vae_patch_size

    config = check_vae_folder(dcae[0])
    assert vae_downsample(config) * vae_patch_size(config) == 32 and (256 // 32) ** 2 == 64


def test_training_previews_of_a_dcae_dataset_use_its_grid_and_pixels(dcae, tmp_path):
    """The grids drawn during training stay near the 6x5-token images the model saw (not SD's 16
    tokens a side), and a token is 32 pixels of the decoded picture."""
    from fitscale.config import load_config
    from fitscale.train.previews import PeriodicSamples

    _, data = dcae
    config = load_config("recipes/demo.yaml", [f"data.path={data}", "train.sample_every=10"])
    items = PeriodicSamples(config).items
    assert max(max(item.rows, item.cols) for item in items) <= 2 * 6  # default grids: up to 2x beyond
    assert {item.pixels_per_token for item in items} == {32}
