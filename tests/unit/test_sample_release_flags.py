"""`fitscale sample --interpolation/--decouple/--ori-max-pe-len`: the release's sampling flags for RoPE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fitscale.cli import main
from fitscale.models import build_model
from fitscale.models.extrapolation import release_sampling_overrides
from fitscale.sample.generate import generate_latents, load_sampling_model
from fitscale.sample.options import SamplingOptions
from fitscale.sample.plan import plan_items


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model("tiny")
    with torch.no_grad():
        for param in model.parameters():  # the released init zeroes the output layer
            param.add_(torch.randn_like(param) * 0.05)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def sample_once(weights_file, overrides: dict) -> torch.Tensor:
    model = load_sampling_model(weights_file, "tiny", {"attn_backend": "reference", **overrides})
    items = plan_items([(96, 32)], 1, 10, [3], 0)
    return generate_latents(model, items, SamplingOptions(steps=1))[0]


def test_release_flags_reach_the_model(weights_file, tmp_path):
    out = tmp_path / "partntk"
    flags = "--model tiny --set attn_backend=reference --height 96 --width 32 --num-per-size 1 --labels 3 "
    flags += "--steps 1 --device cpu --interpolation partntk --decouple --ori-max-pe-len 2"
    assert main(["sample", str(weights_file), "--out", str(out), *flags.split()]) == 0
    written = torch.from_numpy(np.load(out / "latents" / "000000.npy"))
    expected = sample_once(
        weights_file, release_sampling_overrides("partntk", decouple=True, ori_max_pe_len=2)
    )
    assert torch.equal(written, expected)  # the CLI runs the same sampling call; .npy keeps float32 bits
    assert not torch.allclose(
        written, sample_once(weights_file, {}), rtol=1e-3, atol=1e-4
    )  # the flags matter


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            "--interpolation yarn --ori-max-pe-len 0",
            "--ori-max-pe-len 0: give the training grid edge in tokens, an integer of 1 or more "
            "(16 for the 256-token models)",
        ),
        (
            "--decouple",
            "--decouple goes with --interpolation (the release's flags); e.g. --interpolation dynntk",
        ),
        (
            "--ori-max-pe-len 16",
            "--ori-max-pe-len goes with --interpolation (the release's flags); e.g. --interpolation dynntk",
        ),
        (
            "--interpolation dynntk --extrapolation ntk",
            "--extrapolation ntk and --interpolation dynntk both choose the RoPE extrapolation: give one",
        ),
        (
            "--interpolation ntk",
            "--interpolation 'ntk': choose one of no, linear, dynntk, partntk, yarn, ntkpro1, ntkpro2",
        ),
        (
            "--interpolation ntkpro2 --attn-scale",
            "--attn-scale with --interpolation ntkpro2: that method scales attention already; drop --attn-scale",
        ),
    ],
)
def test_bad_release_flags_are_one_line_errors_and_write_nothing(
    weights_file, tmp_path, capsys, flags, message
):
    out = tmp_path / "out"
    argv = [
        "sample",
        str(weights_file),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--height",
        "64",
        "--width",
        "64",
    ]
    assert main([*argv, *flags.split()]) == 2
    assert capsys.readouterr().err == f"fitscale sample: error: {message}\n"
    assert not out.exists()
