"""Labelled grids: rows by class, columns by size, every picture in its cell, labels and a caption drawn."""

import numpy as np
import pytest

from fitscale.sample.options import SamplingOptions
from fitscale.sample.pictures import class_size_grid, extrapolation_name, grid_caption, labelled_grid
from fitscale.sample.plan import SampleItem


def solid(rows: int, cols: int, colour: tuple[int, int, int]) -> np.ndarray:
    return np.tile(np.array(colour, dtype=np.uint8), (rows, cols, 1))


def bbox(grid: np.ndarray, colour) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero((grid == np.array(colour, dtype=np.uint8)).all(axis=2))
    return ys.min(), ys.max(), xs.min(), xs.max()


def test_class_size_grid_puts_each_image_at_its_class_row_and_size_column():
    # classes 7 and 2, sizes 4x4 and 2x6 tokens; class 7 has two images at 4x4; given out of order
    items = [
        SampleItem(0, 7, 4, 4),
        SampleItem(1, 2, 2, 6),
        SampleItem(2, 7, 4, 4),
        SampleItem(3, 2, 4, 4),
        SampleItem(4, 7, 2, 6),
    ]
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0), (0, 200, 200)]
    pictures = [solid(it.rows * 2, it.cols * 2, c) for it, c in zip(items, colours)]
    grid = class_size_grid(
        items,
        pictures,
        ["zero", "one", "two", "three", "four", "five", "six", "seven"],
        caption="step 5",
        size_unit="tokens",
        scale=3,
    )
    boxes = [bbox(grid, c) for c in colours]
    for (top, bottom, left, right), it in zip(boxes, items):
        assert (bottom - top + 1, right - left + 1) == (it.rows * 6, it.cols * 6)  # upscaled 3x, whole
    centre_y = [(b[0] + b[1]) / 2 for b in boxes]
    centre_x = [(b[2] + b[3]) / 2 for b in boxes]
    # rows: class 2 above class 7; columns: 4x4, 4x4 (second image), 2x6 in the order sizes first appear
    assert centre_y[1] == centre_y[3] < centre_y[0] == centre_y[2] == centre_y[4]
    assert centre_x[0] == centre_x[3] < centre_x[2] < centre_x[1] == centre_x[4]
    # label text: dark pixels left of the first column, above the first row and below the last
    dark = (grid < 100).all(axis=2)
    first_left = min(b[2] for b in boxes)
    first_top = min(b[0] for b in boxes)
    last_bottom = max(b[1] for b in boxes)
    assert dark[:, :first_left].any() and dark[:first_top].any()
    assert (grid[last_bottom + 1 :] < 100).all(axis=2).any()


def test_labelled_grid_rejects_labels_that_do_not_match():
    with pytest.raises(ValueError, match="2 row and 1 column labels for a 1 x 1 grid of cells"):
        labelled_grid([[solid(2, 2, (0, 0, 0))]], ["a", "b"], ["c"])


def test_caption_names_step_guidance_sampler_and_extrapolation():
    from fitscale.models import build_config

    config = build_config("tiny", rope_method="ntk", rope_decoupled=True)
    options = SamplingOptions(sampler="heun", steps=12, cfg_scale=4.0, seed=3)
    assert grid_caption(options, extrapolation_name(config), step=400) == (
        "step 400 | cfg 4 | heun 12 steps | extrapolation vision-ntk | seed 3   (rows: class, columns: pixels)"
    )
    sde = SamplingOptions(mode="sde", steps=40, diffusion_form="SBDM", cfg_scale=1.5, scale_pow=1.0)
    assert grid_caption(sde, "none").startswith(
        "cfg 1.5 pow 1 | SDE euler 40 steps sbdm | extrapolation none"
    )
    assert "| dopri5 rtol 0.001 |" in grid_caption(SamplingOptions(sampler="dopri5"), "none")
