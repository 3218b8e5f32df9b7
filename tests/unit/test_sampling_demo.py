"""The demo's digit check: rendering a real digit and reading it back gives the classifier's input."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fitscale.data.sources import render_digit
from fitscale.sample.demo import digits_classifier, latent_to_digit


def test_reading_back_rendered_digits_recovers_them_at_any_aspect_ratio():
    digits = load_digits()
    classifier = digits_classifier()
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(digits.images), 200, replace=False)
    recovered, labels = [], []
    for index in chosen:
        rows, cols = (int(v) for v in rng.integers(4, 17, size=2))
        latent = render_digit(digits.images[index], rows, cols)
        back = latent_to_digit(latent)
        assert back.shape == (8, 8) and 0 <= back.min() and back.max() <= 16
        recovered.append(back.reshape(64))
        labels.append(digits.target[index])
    accuracy = (classifier.predict(np.stack(recovered)) == np.array(labels)).mean()
    assert accuracy >= 0.9, f"only {accuracy:.0%} of re-read real digits recognised"


def test_demo_grids_stay_within_the_trained_sides_and_cover_three_aspects():
    from fitscale.sample.demo import demo_grids

    assert demo_grids(4, 8) == ((6, 6), (4, 8), (8, 4), (8, 8))
    for low, high in ((4, 8), (4, 16), (2, 5)):
        grids = demo_grids(low, high)
        assert all(low <= side <= high for grid in grids for side in grid)
        assert {rows > cols for rows, cols in grids} == {True, False}


def test_demo_refuses_a_digits_dataset_of_other_sizes(tmp_path):
    import json

    import pytest

    from fitscale.data.format import FORMAT_NAME, FORMAT_VERSION, META_FILE
    from fitscale.sample.demo import maybe_prepare_digits

    folder = tmp_path / "digits"
    folder.mkdir()
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "writer": "digits", "grid_sides": [4, 16]}
    (folder / META_FILE).write_text(json.dumps(meta))
    maybe_prepare_digits(str(folder), 4, 16)  # the same sizes: reused as it is
    with pytest.raises(ValueError) as info:
        maybe_prepare_digits(str(folder), 4, 8)
    assert str(info.value) == (
        f"{folder}: this digits dataset has grid sides 4..16 tokens but the recipe asks for "
        f"hooks.options.digits_min_side=4, hooks.options.digits_max_side=8; delete {folder} to have it "
        "rewritten, or point data.path at another folder"
    )
    assert json.loads((folder / META_FILE).read_text()) == meta  # nothing rewritten


def test_demo_hooks_are_named_by_the_recipe_and_check_their_options():
    from fitscale.config import load_config
    from fitscale.sample.demo import DemoOptions, prepare_digits, sample_grid
    from fitscale.train.cli import resolve_hook

    config = load_config("recipes/demo.yaml")
    assert [resolve_hook("before", n) for n in config.hooks.before] == [prepare_digits]
    assert [resolve_hook("after", n) for n in config.hooks.after] == [sample_grid]
    assert DemoOptions.from_config(config) == DemoOptions(digits_max_side=8, sample_cfg_scale=6.0)
    bad = load_config("recipes/demo.yaml", ["hooks.options.sample_cfg=2"])
    with pytest.raises(ValueError) as info:
        DemoOptions.from_config(bad)
    assert str(info.value) == (
        "hooks.options: unknown config key 'sample_cfg'; top-level fields are: digits_min_side, "
        "digits_max_side, sample_cfg_scale"
    )


def test_a_hook_that_is_not_there_is_refused_by_name():
    from fitscale.config import ConfigError, load_config
    from fitscale.train.cli import resolve_hook

    with pytest.raises(ValueError, match=r"^hooks.after: 'fitscale.sample.demo:no_such' cannot be found \("):
        resolve_hook("after", "fitscale.sample.demo:no_such")
    with pytest.raises(ConfigError) as info:
        load_config("recipes/demo.yaml", ["hooks.before=[fitscale.sample.demo]"])
    assert str(info.value) == (
        "hooks.before: 'fitscale.sample.demo' is not module:function, e.g. fitscale.sample.demo:prepare_digits"
    )
