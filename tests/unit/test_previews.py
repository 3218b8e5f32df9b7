"""What the training-time sample grids draw: classes, sizes (one beyond the training grid) and a
VAE folder checked at start-up."""

import pytest

from fitscale.train.previews import default_grids, default_labels


def test_a_missing_sample_vae_is_refused_at_start_up(tmp_path):
    from fitscale.config import ConfigError, load_config
    from fitscale.train.previews import PeriodicSamples

    config = load_config(
        "recipes/demo.yaml",
        [f"data.path={tmp_path}", "train.sample_every=10", f"train.sample_vae={tmp_path / 'vae'}"],
    )
    with pytest.raises(ConfigError) as info:
        PeriodicSamples(config)
    assert str(info.value) == (
        f"train.sample_vae={tmp_path / 'vae'}: no such folder; expected a diffusers autoencoder saved with "
        "save_pretrained (config.json and its weights)"
    )


def test_default_rows_and_columns():
    assert default_labels(10) == list(range(10))
    assert default_labels(1000) == [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]
    assert default_labels(3) == [0, 1, 2]
    # the digits demo trains up to 8x8 tokens, ImageNet 256 up to 16x16
    assert default_grids(8) == [(8, 8), (4, 8), (8, 4), (10, 10)]
    assert default_grids(16) == [(16, 16), (8, 16), (16, 8), (20, 20)]


def test_grid_items_use_the_dataset_classes_and_sides(tmp_path):
    import json

    from fitscale.config import load_config
    from fitscale.data.format import FORMAT_NAME, FORMAT_VERSION, META_FILE
    from fitscale.train.previews import PeriodicSamples

    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "writer": "digits", "num_classes": 10}
    meta |= {"classes": [f"c{i}" for i in range(10)], "grid_sides": [4, 8], "preview_channel": 2}
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    config = load_config(
        "recipes/demo.yaml", [f"data.path={tmp_path}", "train.sample_every=5", "train.sample_labels=[3,1]"]
    )
    samples = PeriodicSamples(config)
    assert [(i.index, i.label, i.rows, i.cols) for i in samples.items[:5]] == [
        (0, 3, 8, 8),
        (1, 3, 4, 8),
        (2, 3, 8, 4),
        (3, 3, 10, 10),
        (4, 1, 8, 8),
    ]
    assert (samples.class_names[3], samples.preview_channel) == ("c3", 2)
    assert [s for s in range(1, 1601) if samples.due(s)][:3] == [5, 10, 15] and samples.due(1600)
