"""fitscale's packed forward computes the released FiTv2's padded forward (issue 2's acceptance).

Both models hold the same random weights in the release's format, with every parameter non-zero
(the release's zero-initialised modulation and output layers included, so no path is hidden).
Each image's output is compared on its own: ||fitscale - release|| / ||release|| < 1e-5 in fp32.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, home of the reference package

from reference.pairs import build_pair, packed_forward, random_images, reference_forward, relative_error  # noqa: E402

GRIDS_256 = [(16, 16), (12, 20), (8, 8), (5, 31)]
GRIDS_1024 = [(32, 32), (20, 40), (9, 50), (5, 31)]
TOLERANCE = 1e-5


def assert_equivalent(name: str, grids, limit: int, seed: int = 0, **overrides) -> None:
    model, reference, _ = build_pair(name, seed=seed, **overrides)
    token_dim = model.config.token_dim
    images = random_images(grids, token_dim, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    t = torch.rand(len(grids), generator=generator)
    y = torch.randint(0, model.config.num_classes + 1, (len(grids),), generator=generator)
    y[-1] = model.config.num_classes  # the null class of guidance
    with torch.no_grad():
        ours = packed_forward(model, images, grids, t, y)
        theirs = reference_forward(reference, images, grids, t, y, limit)
    errors = [relative_error(a, b) for a, b in zip(ours, theirs)]
    assert max(errors) < TOLERANCE, f"relative error per image {dict(zip(grids, errors))}"


def test_fitv2_xl_matches_release_on_mixed_grids():
    assert_equivalent("fitv2-xl", GRIDS_256, 256, depth=2)


def test_fitv2_xl_hr_matches_release_on_mixed_grids():
    assert_equivalent("fitv2-xl-hr", GRIDS_1024, 1024, depth=2)


@pytest.mark.slow
def test_fitv2_xl_full_depth_matches_release():
    assert_equivalent("fitv2-xl", [(16, 16), (5, 31)], 256, seed=1)


# Every method x coupled/decoupled x attention scale; per-image vs fixed frequencies alternate so that
# each of them meets both values of the other two switches (a pairwise design: 20 cases, not 40).
ROPE_CASES = [
    dict(
        rope_method=method,
        rope_decoupled=decoupled,
        rope_attn_scale=attn_scale,
        **(dict(rope_per_image=True) if decoupled != attn_scale else dict(rope_target_grid=(24, 40))),
    )
    for method, decoupled, attn_scale in itertools.product(
        ("none", "linear", "ntk", "ntk_by_parts", "yarn"), (False, True), (False, True)
    )
]


def rope_case_id(rope: dict) -> str:
    return "-".join(
        [
            rope["rope_method"],
            "decoupled" if rope["rope_decoupled"] else "coupled",
            "attn-scale" if rope["rope_attn_scale"] else "no-scale",
            "per-image" if rope.get("rope_per_image") else "fixed",
        ]
    )


@pytest.mark.parametrize("rope", ROPE_CASES, ids=rope_case_id)
def test_every_rope_method_matches_release(rope):
    small = dict(hidden_size=96, num_heads=2, adaln_lora_rank=16, depth=2, num_classes=10)
    grids = [(16, 16), (12, 20), (5, 31), (20, 30), (9, 40)]  # under, at and over L0 on each axis
    assert_equivalent("tiny", grids, 640, **small, **rope)
