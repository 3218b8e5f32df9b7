"""`fitscale convert export` and `official-to-fitscale` through the real CLI entry point."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fitscale.checkpoint import CheckpointManager, ModelState, OptimizerState
from fitscale.cli import main
from fitscale.config.checkpoint import CheckpointConfig
from fitscale.config.optim import EMAConfig, OptimConfig
from fitscale.data.batch import pack_images
from fitscale.models import build_model
from fitscale.models.official import export_official_state_dict
from fitscale.parallel.ema import EMA
from fitscale.train.optim import build_optimizer

MODEL = {"name": "tiny", "overrides": {"attn_backend": "reference"}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder with one checkpoint of a tiny FiT after two steps (weights != EMA)."""
    run_dir = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = build_model(MODEL["name"], **MODEL["overrides"])
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    ema = EMA(model, EMAConfig(decay=0.5))
    for step in (1, 2):
        grids = [(2, 3), (3, 3)]
        batch = pack_images([torch.randn(r * c, 16) for r, c in grids], grids, [0, 1], [0, 1], null_class=10)
        out = model(batch.tokens, torch.rand(2), batch.labels, batch.pos, batch.cu_seqlens)
        (out - batch.tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(step)
    (run_dir / "config.yaml").write_text("model:\n  name: tiny\n  overrides:\n    attn_backend: reference\n")
    manager = CheckpointManager(run_dir, CheckpointConfig(), handle_signals=False)
    manager.save(2, {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "ema": ema})
    return run_dir, model, ema


def test_export_weights_fp32_in_fitscale_names(trained, tmp_path):
    run_dir, model, _ = trained
    out = tmp_path / "weights.safetensors"
    assert main(["convert", "export", str(run_dir), "--out", str(out)]) == 0
    exported = load_file(str(out))
    expected = model.state_dict()
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert exported[key].dtype == torch.float32 and torch.equal(exported[key], value), key


def test_export_ema_bf16_in_official_names(trained, tmp_path):
    run_dir, model, ema = trained
    out = tmp_path / "ema.safetensors"
    step_dir = run_dir / "checkpoints" / "step-2"
    args = [
        "convert",
        "export",
        str(step_dir),
        "--out",
        str(out),
        "--ema",
        "--dtype",
        "bf16",
        "--names",
        "official",
    ]
    assert main(args) == 0
    exported = load_file(str(out))
    reference = build_model(MODEL["name"], **MODEL["overrides"])
    ema.copy_to(reference)
    expected = export_official_state_dict(reference, torch.bfloat16)
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(exported[key], value), key
    assert not torch.equal(exported["final_layer.linear.weight"], model.final_layer.linear.weight.bfloat16())


def test_export_refuses_to_overwrite_and_names_missing_checkpoints(trained, tmp_path, capsys):
    run_dir, _, _ = trained
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    assert main(["convert", "export", str(run_dir), "--out", str(out)]) == 2
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["convert", "export", str(empty), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert f"{empty} holds no complete checkpoint" in capsys.readouterr().err


def test_official_to_fitscale_round_trip(tmp_path):
    torch.manual_seed(3)
    released = export_official_state_dict(build_model("tiny"))
    source = tmp_path / "released.pt"
    torch.save({"ema": released}, source)
    out = tmp_path / "ours.safetensors"
    assert main(["convert", "official-to-fitscale", str(source), str(out), "--json"]) == 0
    converted = load_file(str(out))
    model = build_model("tiny")
    model.load_state_dict(converted, strict=True)
    for key, value in export_official_state_dict(model).items():
        assert torch.equal(value, released[key]), key


def test_one_process_readers_load_without_dcps_single_process_warning(trained):
    """`fitscale sample`, `convert export` and the demo's closing grid read a checkpoint in one
    process; DCP warned `torch.distributed is disabled, unavailable or uninitialized` at every read."""
    import warnings

    from fitscale.checkpoint.export import load_dcp_weights, read_weights
    from fitscale.checkpoint.layout import find_checkpoint

    run_dir, model, ema = trained
    step_dir = find_checkpoint(run_dir)
    fresh = build_model(MODEL["name"], **MODEL["overrides"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        load_dcp_weights(fresh, step_dir, ema=False)
        weights = read_weights(step_dir, "ema")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert weights.keys() == dict(model.named_parameters()).keys()
