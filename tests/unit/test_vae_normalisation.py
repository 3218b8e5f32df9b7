"""VAE latent normalisation: shift / per-channel mean and std applied on encode and undone on decode,
recorded in the dataset and compared when sampling with `--vae`.

The formulas are diffusers' own: the SD3 training script encodes (x - shift_factor) * scaling_factor
and its pipeline decodes z / scaling_factor + shift_factor; the SD-XL pipeline decodes
z * latents_std / scaling_factor + latents_mean.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_sampling_vae import tiny_vae as sampling_vae

from fitscale.cli import main
from fitscale.data.vae import check_vae_folder, decode_latents, encode_pixels

MEAN = [0.1, -0.2, 0.3, 0.05]
STD = [1.5, 0.5, 2.0, 1.0]


def tiny_vae(**factors):
    return sampling_vae(**factors).eval()


def pictures_of(vae, raw: torch.Tensor) -> np.ndarray:
    """What the VAE decodes from raw (un-normalised) latents, as uint8 pictures."""
    with torch.no_grad():
        pixels = vae.decode(raw[None]).sample[0]
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "factors, to_model",
    [
        (dict(scaling_factor=1.5305, shift_factor=0.0609), lambda x: (x - 0.0609) * 1.5305),  # SD3's values
        (
            dict(scaling_factor=0.5, latents_mean=MEAN, latents_std=STD),
            lambda x: (x - torch.tensor(MEAN).view(-1, 1, 1)) * 0.5 / torch.tensor(STD).view(-1, 1, 1),
        ),
        (dict(scaling_factor=0.18215), lambda x: x * 0.18215),  # the release's sd-vae-ft-ema: unchanged
    ],
)
def test_encode_and_decode_apply_the_vaes_own_normalisation(factors, to_model):
    vae = tiny_vae(**factors)
    pixels = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mean  # (1, 4, 4, 6)
    latents = encode_pixels(vae, pixels)
    # the same encoder; the normalisation written two ways (scalar or tensor operands): a few fp32
    # roundings of values near 1 (measured equal), 1e-6 is about 16 of them
    torch.testing.assert_close(latents, to_model(raw), rtol=1e-6, atol=1e-6)
    decoded = decode_latents(vae, [latents[0]])[0]
    assert np.abs(decoded.astype(int) - pictures_of(vae, raw[0]).astype(int)).max() <= 1  # rounding only


def test_a_vae_with_factors_fitscale_cannot_apply_is_refused_by_name(tmp_path):
    tiny_vae(shift_factor=0.1, latents_mean=MEAN, latents_std=STD).save_pretrained(tmp_path / "both")
    with pytest.raises(
        ValueError, match=r"--vae .*both: sets both shift_factor=0.1 and latents_mean/latents_std"
    ):
        check_vae_folder(tmp_path / "both")
    tiny_vae(latents_mean=MEAN[:3], latents_std=STD[:3]).save_pretrained(tmp_path / "three")
    with pytest.raises(
        ValueError, match=r"latents_mean must list 4 values \(latent_channels\), got \[0.1, -0.2, 0.3\]"
    ):
        check_vae_folder(tmp_path / "three")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A dataset written from images with a shifted VAE, and a run (one checkpoint) trained on it."""
    from fitscale.checkpoint import CheckpointManager, ModelState
    from fitscale.config.checkpoint import CheckpointConfig
    from fitscale.models import build_model

    root = tmp_path_factory.mktemp("vae_run")
    tiny_vae(scaling_factor=1.5305, shift_factor=0.0609).save_pretrained(root / "vae_sd3")
    tiny_vae(scaling_factor=0.18215).save_pretrained(root / "vae_sd")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "images" / label).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(
            root / "images" / label / "x.png"
        )
    args = ["data", "from-images", root / "images", root / "data", "--vae", root / "vae_sd3"]
    assert main([str(a) for a in [*args, "--resolution", 64, "--num-classes", 2, "--no-progress"]]) == 0
    torch.manual_seed(0)
    model = build_model("tiny", attn_backend="reference")
    run = root / "run"
    CheckpointManager(run, CheckpointConfig(), handle_signals=False).save(1, {"model": ModelState(model)})
    (run / "config.yaml").write_text(
        f"model:\n  name: tiny\n  overrides:\n    attn_backend: reference\ndata:\n  path: {root / 'data'}\n"
    )
    return root


def test_the_dataset_records_its_vaes_factors(trained):
    meta = json.loads((trained / "data" / "fitscale.json").read_text())
    assert meta["vae"] == {
        "path": str(trained / "vae_sd3"),
        "class": "AutoencoderKL",
        "latent_channels": 4,
        "downsample": 8,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "latents_mean": None,
        "latents_std": None,
    }


def test_sampling_with_another_vae_than_the_datasets_is_refused(trained, tmp_path, capsys):
    common = ["sample", str(trained / "run"), "--height", "32", "--width", "32", "--num-per-size", "1"]
    common += ["--steps", "2", "--device", "cpu"]
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "bad"), "--vae", str(trained / "vae_sd")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"--vae {trained / 'vae_sd'} normalises latents with scaling_factor=0.18215, but the model was "
            f"trained on {trained / 'data'}, encoded by {trained / 'vae_sd3'} with scaling_factor=1.5305, "
            "shift_factor=0.0609; decode with that VAE (or one with the same factors)"
        )
    )
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    assert main([*common, "--out", str(tmp_path / "good"), "--vae", str(trained / "vae_sd3"), "--raw"]) == 0
    assert len(list((tmp_path / "good" / "images").glob("*.png"))) == 1
