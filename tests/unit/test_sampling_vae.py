"""`fitscale sample --vae PATH`: pictures decoded by a local AutoencoderKL, and bad folders named.

The AutoencoderKL is tiny and randomly initialised (4 blocks, so it upsamples by 8 like the
Stable Diffusion VAE the paper uses), saved with `save_pretrained` into a temporary folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers.tiny_models import tiny_vae
from PIL import Image

from fitscale.cli import main
from fitscale.data.vae import decode_latents, load_vae
from fitscale.models import build_model
from fitscale.sample.generate import generate_latents
from fitscale.sample.options import SamplingOptions
from fitscale.sample.plan import plan_items

SIZES = [(32, 32), (48, 80)]  # pixels: 4x4 and 6x10 latents, 2x2 and 3x5 tokens


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny FiT weights file, a matching VAE folder and an 8-channel one."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    model = build_model("tiny", attn_backend="reference")
    with torch.no_grad():
        for param in model.parameters():  # the released init zeroes the output layer
            param.add_(torch.randn_like(param) * 0.05)
    save_file(model.state_dict(), str(root / "tiny.safetensors"))
    tiny_vae().save_pretrained(root / "vae")
    tiny_vae(latent_channels=8).save_pretrained(root / "vae8")
    return root


def sample_args(folders, out, *extra: str) -> list[str]:
    sizes = [arg for h, w in SIZES for arg in ("--height", str(h), "--width", str(w))]
    common = "--model tiny --set attn_backend=reference --num-per-size 2 --labels 1,7 --steps 2 --device cpu"
    return ["sample", str(folders / "tiny.safetensors"), "--out", str(out), *sizes, *common.split(), *extra]


def test_sample_decodes_pngs_at_the_requested_sizes(folders, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(sample_args(folders, out, "--vae", str(folders / "vae"), "--json")) == 0
    assert json.loads(capsys.readouterr().out)["sizes"] == ["32x32", "48x80"]
    files = sorted((out / "images").iterdir())
    assert [p.name for p in files] == [
        "000000_class1_32x32.png",
        "000001_class7_32x32.png",
        "000002_class1_48x80.png",
        "000003_class7_48x80.png",
    ]
    assert not (out / "latents").exists()  # decoded pictures replace the latents
    pictures = [np.asarray(Image.open(p)) for p in files]
    assert [p.shape for p in pictures] == [(32, 32, 3)] * 2 + [(48, 80, 3)] * 2  # 8x the latent size
    assert np.load(out / "samples_48x80.npz")["arr_0"].shape == (2, 48, 80, 3)
    assert (out / "grid.png").is_file()
    # The PNGs are the VAE's decoding of the sampled latents, not a stand-in.
    model = build_model("tiny", attn_backend="reference")
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folders / "tiny.safetensors")))
    items = plan_items(SIZES, 2, 10, [1, 7], seed=0)
    latents = generate_latents(model, items, SamplingOptions(steps=2))
    expected = decode_latents(load_vae(folders / "vae", "cpu", 4), latents)
    assert len({p.tobytes() for p in expected}) == 4  # random weights still give distinct pictures
    for picture, want in zip(pictures, expected):
        assert np.abs(picture.astype(int) - want.astype(int)).max() <= 1  # PNG round trip of uint8


def pipeline_root(root, tmp):
    (tmp / "bad" / "vae").mkdir(parents=True)
    return tmp / "bad"


def unet_folder(root, tmp):
    (tmp / "bad").mkdir()
    (tmp / "bad" / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    return tmp / "bad"


def config_without_weights(root, tmp):
    (tmp / "bad").mkdir()
    (tmp / "bad" / "config.json").write_text((root / "vae" / "config.json").read_text())
    return tmp / "bad"


BAD_FOLDERS = {
    "missing": (lambda root, tmp: tmp / "bad", "no such folder"),
    "empty": (lambda root, tmp: tmp, "no config.json in the folder"),
    "pipeline": (pipeline_root, "a diffusers pipeline: pass its vae/ subfolder"),
    "unet": (
        unet_folder,
        "config.json describes UNet2DModel, not an autoencoder fitscale knows (AutoencoderDC, AutoencoderKL)",
    ),
    "no-weights": (config_without_weights, "no weights file (diffusion_pytorch_model.safetensors"),
    "channels": (
        lambda root, tmp: root / "vae8",
        "decodes 8-channel latents but the model makes 4-channel ones",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_a_bad_vae_folder_is_named_in_one_line_before_sampling(folders, tmp_path, capsys, case):
    make, message = BAD_FOLDERS[case]
    (tmp_path / "in").mkdir()
    bad = make(folders, tmp_path / "in")
    out = tmp_path / "samples"
    assert main(sample_args(folders, out, "--vae", str(bad))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--vae {bad}: " in lines[0] and message in lines[0], lines
    assert not (out / "images").exists() or not any((out / "images").iterdir())
