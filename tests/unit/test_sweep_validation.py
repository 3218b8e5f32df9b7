"""Validation loss: deterministic, independent of packing and ranks' split, EMA reported apart."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fitscale.config.data import DataConfig
from fitscale.train.validation import ValidationSettings, run_validation, validation_batches


@pytest.fixture(scope="module")
def digits_split(tmp_path_factory):
    from fitscale.data.sources import build_digits
    from fitscale.data.writer import WriteSettings, write_dataset

    out = tmp_path_factory.mktemp("val") / "digits_val"
    build, _ = build_digits(seed=1, dtype="float32")
    settings = WriteSettings(writer="digits", num_classes=10, options={"dtype": "float32", "seed": 1})
    write_dataset(out, [(d, 0) for d in range(40)], build, settings, progress=False)
    return DataConfig(path=str(out), val_path=str(out), num_classes=10, token_budget=512, num_workers=0)


def model():
    from fitscale.models import build_model

    torch.manual_seed(0)
    net = build_model("tiny", attn_backend="reference")
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return net


def test_validation_is_a_fixed_function_of_weights_and_split(digits_split):
    net = model().train()
    settings = ValidationSettings(timesteps=(0.2, 0.6), seed=3)
    batches = validation_batches(digits_split)
    first = run_validation(net, batches, settings)
    again = run_validation(net, validation_batches(digits_split), settings)
    assert first == again
    assert net.training  # put back in training mode
    assert first["val_images"] == 40
    assert first["val_loss"] == pytest.approx((first["val_loss_t0.200"] + first["val_loss_t0.600"]) / 2)
    # Another packing of the same images (smaller micro-batches) scores the same.
    repacked = validation_batches(dataclasses.replace(digits_split, token_budget=256))
    assert len(repacked) > len(batches)
    # fp32 per-image losses, other shapes: ~1e-7 each, their float64 mean no worse (measured 7e-9)
    assert run_validation(net, repacked, settings)["val_loss"] == pytest.approx(first["val_loss"], rel=1e-6)
    # Two halves (as two ranks would hold them) sum to the same per-image mean.
    half = len(batches) // 2
    a = run_validation(net, batches[:half], settings)
    b = run_validation(net, batches[half:], settings)
    mean = (a["val_loss"] * a["val_images"] + b["val_loss"] * b["val_images"]) / 40
    assert mean == pytest.approx(first["val_loss"], rel=1e-12)  # the same batches: only float64 sums differ
    assert run_validation(net, batches, ValidationSettings(seed=4))["val_loss"] != first["val_loss"]


def test_ema_weights_are_scored_and_restored(digits_split):
    from fitscale.config.optim import EMAConfig
    from fitscale.parallel.ema import EMA

    net = model()
    ema = EMA(net, EMAConfig(decay=0.0))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(0.5)
    metrics = run_validation(
        net, validation_batches(digits_split, max_images=8), ValidationSettings(), ema=ema
    )
    assert metrics["val_images"] == 8 and metrics["val_loss_ema"] != metrics["val_loss"]
    assert all(torch.equal(v, before[k] * 0.5) for k, v in net.state_dict().items())


def test_validation_needs_a_split():
    with pytest.raises(ValueError, match="data.val_path: no validation split is configured"):
        validation_batches(DataConfig(path="x"))
