"""Packing is invisible: an image's output and gradients do not depend on what shares its batch."""

from __future__ import annotations

import pytest
import torch
from reference.official_fitv2 import random_official_state_dict
from reference.pairs import (
    build_fitscale,
    pack,
    packed_forward,
    random_images,
    reference_config_of,
    relative_error,
)

# Per-image frequencies with every scaling switched on: each segment must get its own rotation.
PER_IMAGE_ROPE = dict(rope_method="yarn", rope_decoupled=True, rope_attn_scale=True, rope_per_image=True)
GRIDS = [(12, 20), (5, 31), (8, 8), (20, 20), (1, 3)]


def tiny_model(seed: int = 0, **overrides):
    """The tiny preset with non-zero random weights (a zero-initialised output would hide everything)."""
    from fitscale.models.official import load_official_state_dict

    model = build_fitscale("tiny", **PER_IMAGE_ROPE, **overrides)
    load_official_state_dict(model, random_official_state_dict(reference_config_of(model.config), seed=seed))
    return model


def inputs(grids, seed: int = 0):
    generator = torch.Generator().manual_seed(seed + 1)
    t = torch.rand(len(grids), generator=generator)
    y = torch.randint(0, 10, (len(grids),), generator=generator)
    return random_images(grids, seed=seed), t, y


def assert_close(actual, expected, what: str):
    """Relative (norm) error below 3e-5: other batch shapes change fp32 matmul and reduction orders;
    the three CPU kernel sets give at most 1.0e-6 (gradients), 4e-7 (outputs), so 30x margin, while a
    leak between images changes attention outputs at first order."""
    error = relative_error(actual, expected)
    assert error < 3e-5, f"{what}: relative error {error:.2e}"


@pytest.mark.numeric
@torch.no_grad()
def test_an_images_output_does_not_depend_on_its_batch():
    model = tiny_model().eval()
    images, t, y = inputs(GRIDS)
    alone = [
        packed_forward(model, [im], [g], t[i : i + 1], y[i : i + 1])[0]
        for i, (im, g) in enumerate(zip(images, GRIDS))
    ]
    orders = [[0, 1, 2, 3, 4], [3, 0, 4], [4, 2, 1, 0]]
    for order in orders:
        for budget in (None, 1200):
            outs = packed_forward(
                model,
                [images[i] for i in order],
                [GRIDS[i] for i in order],
                t[order],
                y[order],
                token_budget=budget,
            )
            for out, i in zip(outs, order):
                assert_close(out, alone[i], f"image {GRIDS[i]} in batch {order}, budget {budget}")


@torch.no_grad()
def test_sizes_default_to_the_grid_the_positions_span():
    model = tiny_model().eval()
    images, t, y = inputs(GRIDS)
    batch = pack(images, GRIDS, y, null_class=10)
    given = model(batch.tokens, t, batch.labels, batch.pos, batch.cu_seqlens, batch.max_seqlen, batch.sizes)
    derived = model(batch.tokens, t, batch.labels, batch.pos, batch.cu_seqlens, batch.max_seqlen)
    assert torch.equal(given, derived)


@pytest.mark.numeric
def test_packed_gradients_equal_one_image_at_a_time():
    model = tiny_model(class_dropout_prob=0.0).train()
    images, t, y = inputs(GRIDS)
    weights = [torch.randn_like(image) for image in images]  # a loss that reaches every output value

    def run(indices):
        xs = [images[i].clone().requires_grad_() for i in indices]
        outs = packed_forward(model, xs, [GRIDS[i] for i in indices], t[indices], y[indices])
        sum((out * weights[i]).sum() for out, i in zip(outs, indices)).backward()
        return [x.grad for x in xs]

    model.zero_grad()
    packed_input_grads = run(list(range(len(GRIDS))))
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    single_input_grads = [run([i])[0] for i in range(len(GRIDS))]  # accumulates parameter grads
    for name, p in model.named_parameters():
        assert_close(packed_grads[name], p.grad, f"grad of {name}")
    for grid, packed, single in zip(GRIDS, packed_input_grads, single_input_grads):
        assert_close(packed, single, f"input grad of image {grid}")


@pytest.mark.numeric
def test_label_dropout_happens_only_in_training():
    model = tiny_model(class_dropout_prob=0.5)
    grids = [(2, 2)] * 64
    images, t, _ = inputs(grids)
    labels = torch.full((64,), 3)
    null = torch.full((64,), 10)
    with torch.no_grad():
        model.eval()
        conditional = torch.stack(packed_forward(model, images, grids, t, labels))
        unconditional = torch.stack(packed_forward(model, images, grids, t, null))
        assert torch.equal(torch.stack(packed_forward(model, images, grids, t, labels)), conditional)
        model.train()
        torch.manual_seed(0)
        trained = torch.stack(packed_forward(model, images, grids, t, labels))
        torch.manual_seed(0)
        again = torch.stack(packed_forward(model, images, grids, t, labels))
    assert torch.equal(trained, again), "label dropout must follow the global torch RNG"
    # the same batch, shapes and kernels, only the label row differs: a kept or dropped label is exact
    kept = (trained == conditional).flatten(1).all(1)
    dropped = (trained == unconditional).flatten(1).all(1)
    assert bool((kept ^ dropped).all()), "each label is either kept or replaced by the null class"
    assert 8 < int(dropped.sum()) < 56, f"{int(dropped.sum())} of 64 labels dropped at p = 0.5"


@pytest.mark.parametrize("budget", [None, 500])
def test_packed_batch_output_has_one_row_per_token(budget):
    model = tiny_model().eval()
    images, t, y = inputs(GRIDS[:3])
    batch = pack(images, GRIDS[:3], y, token_budget=budget, null_class=10)
    t = torch.cat([t, torch.ones(batch.num_segments - 3)])
    with torch.no_grad():
        out = model(batch.tokens, t, batch.labels, batch.pos, batch.cu_seqlens, batch.max_seqlen, batch.sizes)
    assert out.shape == batch.tokens.shape and bool(torch.isfinite(out).all())
