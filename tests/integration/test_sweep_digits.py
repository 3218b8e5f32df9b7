"""A real sweep end to end on CPU: tiny models on digits, plan -> launch --local -> collect -> fit -> plots."""

from __future__ import annotations

import json

import pytest

from fitscale.cli import main

pytestmark = pytest.mark.slow


def test_tiny_digits_sweep_runs_end_to_end(tmp_path, capsys):
    from fitscale.data.sources import build_digits
    from fitscale.data.writer import WriteSettings, write_dataset

    for name, seed, first in (("train", 0, 0), ("val", 1, 1)):
        build, count = build_digits(seed=seed, dtype="float32")
        settings = WriteSettings(writer="digits", num_classes=10, options={"dtype": "float32", "seed": seed})
        write_dataset(
            tmp_path / name, [(d, 0) for d in range(first, count, 8)], build, settings, progress=False
        )
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"""
name: digits-test
recipe: recipes/demo.yaml
out_dir: {tmp_path / "sweep"}
mode: grid
models:
  - {{name: w32, preset: tiny, overrides: {{hidden_size: 32, num_heads: 2, adaln_lora_rank: 8}}}}
  - {{name: w64, preset: tiny, overrides: {{hidden_size: 64}}}}
  - {{name: w96, preset: tiny, overrides: {{hidden_size: 96, num_heads: 4, adaln_lora_rank: 24}}}}
budgets: [1.0e+9, 2.0e+9, 4.0e+9]
global_batch_size: 4
tokens_per_image: 100
overrides: [data.path={tmp_path / "train"}, parallel.sharding=none, checkpoint.interval=0, log.every=1,
            optim.schedule.warmup_steps=2, model.overrides.attn_backend=reference]
validation: {{val_path: {tmp_path / "val"}, max_images: 32, timesteps: [0.25, 0.5, 0.75]}}
digits_quality: {{per_class: 1, grids: [[4, 4]], steps: 2}}
"""
    )
    assert main(["sweep", "plan", str(spec), "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert len(runs) == 9 and all(r["steps"] >= 1 for r in runs)
    assert main(["sweep", "launch", str(spec), "--local", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out).values()) == {"local"}
    # Launching again finds every run finished and starts nothing.
    assert main(["sweep", "launch", str(spec), "--local", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out).values()) == {"done"}
    assert main(["sweep", "collect", str(spec), "--json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert all(r["status"] == "done" and r["val_images"] == 32 for r in rows)
    assert all(r["val_loss"] > 0 and r["val_loss_ema"] > 0 and r["train_loss"] > 0 for r in rows)
    # digits_quality: every run's samples scored (10 images: one per class at 4x4 tokens)
    assert all(r["digits_images"] == 10 and r["digits_frechet"] > 0 for r in rows)
    assert all(r["digits_error"] == pytest.approx(1 - r["digits_recognised"]) for r in rows)
    assert main(["sweep", "fit", str(spec), "--json"]) == 0
    analysis = json.loads(capsys.readouterr().out)
    assert set(analysis["per_model"]) == {"w32", "w64", "w96"}
    for path in ("fits.json", "loss_vs_compute.png"):
        assert (tmp_path / "sweep" / path).is_file()
    assert main(["sweep", "fit", str(spec), "--json", "--metric", "digits_frechet"]) == 0
    assert json.loads(capsys.readouterr().out)["metric"] == "digits_frechet"
