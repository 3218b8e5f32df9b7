"""The demo ends with pictures: a short digits run, then `sample_demo_grid` on its final checkpoint."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_sample_demo_grid_after_a_short_demo_run(tmp_path, capsys):
    from fitscale.config import load_config
    from fitscale.data.sources import build_digits
    from fitscale.data.writer import WriteSettings, write_dataset
    from fitscale.sample.demo import sample_demo_grid
    from fitscale.train.trainer import Trainer

    data = tmp_path / "digits"
    build, count = build_digits(seed=0, dtype="float32")
    settings = WriteSettings(writer="digits", num_classes=10, options={"dtype": "float32"})
    write_dataset(data, [(d, 0) for d in range(0, count, 4)], build, settings, progress=False)
    overrides = [
        f"data.path={data}",
        f"train.run_dir={tmp_path / 'run'}",
        "train.steps=20",
        "parallel.sharding=none",
        "checkpoint.interval=0",
        "model.overrides.attn_backend=reference",
    ]
    Trainer(load_config("recipes/demo.yaml", overrides)).train()
    summary = sample_demo_grid(tmp_path / "run", per_class=1, steps=6, grids=((8, 8), (6, 12), (12, 6)))
    printed = capsys.readouterr().out
    assert "generated digits recognised by a classifier trained on real digits" in printed
    assert summary["images"] == 30 and 0.0 <= summary["recognised"] <= 1.0
    assert set(summary["per_grid"]) == {"8x8", "6x12", "12x6"}
    assert (tmp_path / "run" / "samples" / "digits_grid.png").is_file()
