"""fitscale's RoPE tables are the release's (whlzy/FiT fit/model/rope.py) for every extrapolation method.

The expected tables come from tests/reference/release_rope.py, written from the release's code
alone. Every method (by its release name, so the config's spelling map is under test too) x
coupled/decoupled x fixed/per-image frequencies, on square, wide, tall and one-token-wide grids
below, at and above L0, for the released head dims and for L0 small enough that the correction
ramps' bounds clamp, meet or cross.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from reference.pairs import RELEASE_NAMES, relative_error
from reference.release_rope import RELEASE_METHODS, RopeSpec, image_cos_sin

from fitscale.config.model import build_config
from fitscale.models.extrapolation import release_sampling_overrides
from fitscale.models.rope import rope_cos_sin

# at, below, wide, tall, one token wide or tall, 1x1, far above; relative to L0 = 16
GRIDS = [
    (16, 16),
    (8, 8),
    (12, 20),
    (24, 40),
    (40, 24),
    (20, 12),
    (1, 40),
    (33, 1),
    (1, 1),
    (5, 31),
    (32, 32),
]
TARGETS = [(16, 16), (8, 8), (24, 40), (40, 24), (1, 40), (33, 1)]  # fixed frequencies' grids
PROBES = [(9, 13), (1, 5)]  # images read through fixed frequencies of another grid
# (head_dim, L0): XL's, B's and 3B's heads at the released L0 and at 32; small heads with L0 = 8, 2 and 1,
# where the ramp bounds clamp at 0, meet (split by 0.001) or cross (the ramp is 0 everywhere).
SETUPS = [(72, 16), (64, 32), (96, 16), (48, 8), (32, 2), (32, 1)]
TOLERANCE = 1e-6  # our float32 tables vs the float64 reference: float32 rounding, measured 4.9e-8 (20x)


def grid_of(rows: int, cols: int) -> torch.Tensor:
    """The release's (2, N) grid: column index then row index, tokens row-major."""
    return torch.stack([torch.arange(cols).repeat(rows), torch.arange(rows).repeat_interleave(cols)])


def corners_of(rows: int, cols: int) -> torch.Tensor:
    """Rows and columns 0, 1, 7 and the last of a grid, in the release's (2, N) layout.

    Tables depend on the grid's size, not on how many of its tokens are read, so these few tokens
    test every frequency at the positions that matter (0, 1, the far edge) at a fraction of the cost.
    """
    rows_read = sorted({0, 1, 7, rows - 1} & set(range(rows)))
    cols_read = sorted({0, 1, 7, cols - 1} & set(range(cols)))
    return torch.tensor([[c, r] for r in rows_read for c in cols_read]).T


def our_tables(config, images):
    """fitscale's cos/sin at the corners of `images` packed into one sequence, split back per image."""
    grids = [corners_of(*size) for size in images]
    pos = torch.cat([torch.stack([g[1], g[0]], dim=1) for g in grids])  # (T, 2) row, col
    segment_ids = torch.cat([torch.full((g.shape[1],), i) for i, g in enumerate(grids)])
    cos, sin = rope_cos_sin(config, pos, segment_ids, torch.tensor(images))
    bounds = [0, *itertools.accumulate(g.shape[1] for g in grids)]
    return [(cos[a:b], sin[a:b]) for a, b in zip(bounds, bounds[1:])]


def assert_tables_match(config, spec: RopeSpec, images) -> None:
    for (cos, sin), size in zip(our_tables(config, images), images):
        ref_cos, ref_sin = image_cos_sin(spec, config.head_dim, corners_of(*size), size)
        errors = relative_error(cos, ref_cos), relative_error(sin, ref_sin) if size != (1, 1) else 0.0
        assert max(errors) < TOLERANCE, f"{spec} image {size}: relative errors cos, sin {errors}"


@pytest.mark.parametrize("method", RELEASE_METHODS)
def test_tables_equal_the_releases(method):
    for (head_dim, L0), decouple in itertools.product(SETUPS, (False, True)):
        if L0 == 1 and method in ("ntk-aware-pro1", "ntk-aware-pro2"):
            continue  # their factor divides by ln(L0): refused by ModelConfig
        common = dict(hidden_size=2 * head_dim, num_heads=2, rope_method=method, rope_decoupled=decouple)
        common["rope_base_grid"] = L0
        spec = RopeSpec(custom_freqs=method, decouple=decouple, ori_max_pe_len=L0)
        # per image (the release's online_rope): every grid packed into one sequence
        per_image = build_config("tiny", rope_per_image=True, **common)
        assert_tables_match(per_image, RopeSpec(**{**spec.__dict__, "online_rope": True}), GRIDS)
        # fixed (the release's sampling script): frequencies of one target grid for every image
        for rows, cols in TARGETS:
            fixed = build_config("tiny", rope_target_grid=(rows, cols), **common)
            target = RopeSpec(**{**spec.__dict__, "max_pe_len_h": rows, "max_pe_len_w": cols})
            assert_tables_match(fixed, target, [(rows, cols), *PROBES])


@pytest.mark.parametrize(
    "interpolation, custom_freqs",
    [
        ("no", "normal"),
        ("linear", "linear"),
        ("dynntk", "ntk-aware"),
        ("partntk", "ntk-by-parts"),
        ("yarn", "yarn"),
        ("ntkpro1", "ntk-aware-pro1"),
        ("ntkpro2", "ntk-aware-pro2"),
    ],
)
def test_release_sampling_flags_give_the_scripts_tables_to_every_size_at_once(interpolation, custom_freqs):
    # sample_fitv2_ddp.py builds one model per run with max_pe_len_h/w = the requested grid;
    # the overrides give each image of a mixed batch the tables of that script run at its size.
    sizes = [(24, 40), (16, 16), (1, 33), (12, 9)]
    for decouple in (False, True):
        overrides = release_sampling_overrides(interpolation, decouple=decouple, ori_max_pe_len=12)
        config = build_config("tiny", hidden_size=144, num_heads=2, **overrides)
        for (cos, sin), (rows, cols) in zip(our_tables(config, sizes), sizes):
            spec = RopeSpec(custom_freqs, decouple, False, rows, cols, ori_max_pe_len=12)
            ref_cos, ref_sin = image_cos_sin(spec, 72, corners_of(rows, cols), (rows, cols))
            assert max(relative_error(cos, ref_cos), relative_error(sin, ref_sin)) < TOLERANCE


def test_release_sampling_flags_map_to_model_fields():
    assert release_sampling_overrides("no") == {
        "rope_method": "none",
        "rope_decoupled": False,
        "rope_attn_scale": False,
        "rope_per_image": False,
        "rope_target_grid": None,
    }
    assert release_sampling_overrides("partntk", decouple=True, ori_max_pe_len=32) == {
        "rope_method": "ntk_by_parts",
        "rope_decoupled": True,
        "rope_attn_scale": False,
        "rope_per_image": True,
        "rope_target_grid": None,
        "rope_base_grid": 32,
    }


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(interpolation="ntk"),
            "--interpolation 'ntk': choose one of no, linear, dynntk, partntk, yarn, ntkpro1, ntkpro2",
        ),
        (
            dict(interpolation="yarn", ori_max_pe_len=0),
            "--ori-max-pe-len 0: give the training grid edge in tokens, an integer of 1 or more "
            "(16 for the 256-token models)",
        ),
        (
            dict(interpolation="no", ori_max_pe_len=-16),
            "--ori-max-pe-len -16: give the training grid edge in tokens, an integer of 1 or more "
            "(16 for the 256-token models)",
        ),
        (
            dict(interpolation="ntkpro2", ori_max_pe_len=1),
            "--ori-max-pe-len 1 with --interpolation ntkpro2 divides by ln(1) = 0: use 2 or more",
        ),
    ],
)
def test_bad_release_sampling_flags_name_the_flag(kwargs, message):
    with pytest.raises(ValueError) as error:
        release_sampling_overrides(**kwargs)
    assert str(error.value) == message


def test_release_names_are_stored_as_ours():
    names = {m: build_config("tiny", rope_method=m).rope_method for m in RELEASE_METHODS}
    assert names == {release: ours for ours, release in RELEASE_NAMES.items()}
    assert build_config("tiny", rope_method="NTK-Aware").rope_method == "ntk"  # the release lower-cases
