"""The step planner: world-size independence, balance, budgets, efficiency, resumable state."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from fitscale.config.data import DataConfig
from fitscale.data.batch import pack_images, padding_batch
from fitscale.data.packing import SampleCatalog, StepPlanner
from fitscale.seeds import sample_uniform


def size_table(n: int, max_tokens: int = 1024, seed: int = 0) -> np.ndarray:
    """A sample table with token counts spread over 16..max_tokens and some crop variants."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(4, int(max_tokens**0.5) + 1, size=n)
    cols = np.minimum(rng.integers(4, 64, size=n), max_tokens // rows)
    crop = rng.random(n) < 0.3
    side = int(max_tokens**0.5)
    table = np.zeros((n, 7), np.int64)
    table[:, 0], table[:, 1] = rows, cols
    table[:, 2], table[:, 3] = np.where(crop, side, 0), np.where(crop, side, 0)
    table[:, 4] = rng.integers(0, 10, size=n)
    table[:, 5] = 1
    table[:, 6] = np.arange(n)
    return table


def make_planner(table, mode="images", budget=4096, batch=64, per_rank=2, **overrides) -> StepPlanner:
    catalog = SampleCatalog(
        table,
        seed=3,
        flip_prob=0.5,
        crop_prob=0.5,
        min_tokens=16,
        max_tokens=1024,
        token_budget=budget,
        num_classes=10,
    )
    settings = dict(
        batch_mode=mode,
        global_batch_size=batch,
        token_budget=budget,
        micro_batches_per_step=per_rank,
        lookahead=256,
        seed=3,
        shuffle=True,
    )
    settings.update(overrides)
    return StepPlanner(catalog, **settings)


def step_images(plan) -> list[tuple[int, int]]:
    return sorted((image.epoch, image.index) for bins in plan for b in bins for image in b)


def test_images_mode_takes_the_same_images_on_any_world_size_balanced_and_within_budget():
    table = size_table(500)
    planners = {world: make_planner(table) for world in (1, 2, 3, 8)}
    for _ in range(10):
        plans = {world: planner.next_step(world) for world, planner in planners.items()}
        reference = step_images(plans[1])
        assert len(reference) == 64
        for plan in plans.values():
            assert step_images(plan) == reference
            assert len({len(bins) for bins in plan}) == 1, "every rank runs the same number of micro-batches"
            for bins in plan:
                assert all(sum(image.length for image in b) <= 4096 for b in bins)
        loads = [sum(image.length for b in bins for image in b) for bins in plans[8]]
        assert max(loads) - min(loads) <= 1024  # LPT: within one image of each other


def test_tokens_mode_bin_sequence_is_world_size_independent_and_packs_over_99_percent():
    table = size_table(3000)
    one, three = (
        make_planner(table, mode="tokens", per_rank=3),
        make_planner(table, mode="tokens", per_rank=1),
    )
    bins_one = [b for _ in range(20) for b in one.next_step(1)[0]]
    bins_three = [b for _ in range(20) for bins in three.next_step(3) for b in bins]
    assert bins_one == bins_three
    planner = make_planner(table, mode="tokens", budget=8192, per_rank=1)
    real = bins = 0
    while planner.stream.epoch == 0:
        real += sum(image.length for image in planner.next_step(1)[0][0])
        bins += 1
    assert real / (bins * 8192) >= 0.99


@pytest.mark.parametrize("mode", ["images", "tokens"])
def test_micro_batches_list_their_images_longest_first(mode):
    """The exact CPU attention batches equal lengths without a gather only when they are adjacent."""
    planner = make_planner(size_table(800), mode=mode, per_rank=2)
    bins = [b for _ in range(15) for ranks in planner.next_step(3) for b in ranks]
    assert sum(len(b) for b in bins) > 200
    for b in bins:
        lengths = [image.length for image in b]
        assert lengths == sorted(lengths, reverse=True)


@pytest.mark.parametrize("mode", ["images", "tokens"])
def test_planner_state_resumes_the_exact_sequence_across_epochs(mode):
    table = size_table(150)
    straight = make_planner(table, mode=mode)
    expected = [straight.next_step(2) for _ in range(12)]  # several epochs
    first = make_planner(table, mode=mode)
    for _ in range(5):
        first.next_step(2)
    resumed = make_planner(table, mode=mode)
    resumed.load_state(first.state())
    assert [resumed.next_step(2) for _ in range(7)] == expected[5:]


def test_every_image_once_per_epoch_with_variants_from_seed_epoch_and_sample():
    table = size_table(200)
    planner = make_planner(table, batch=50)
    images = [i for _ in range(4) for bins in planner.next_step(3) for b in bins for i in b]
    seen = Counter(image.index for image in images)
    assert sorted(seen) == list(range(200)) and set(seen.values()) == {1}
    # the stream plans in blocks; a resumed packer re-plans its waiting images one by one
    assert all(planner.stream.catalog.plan(image.epoch, image.index) == image for image in images)
    assert {image.crop for image in images} == {image.flip for image in images} == {False, True}
    assert sample_uniform(3, 1, 7, 1) == sample_uniform(3, 1, 7, 1) != sample_uniform(3, 2, 7, 1)


def test_small_images_skipped_and_counted_and_bad_rows_named():
    table = size_table(50)
    table[0, 0], table[0, 1] = 3, 4  # 12 tokens
    catalog = SampleCatalog(
        table,
        seed=0,
        flip_prob=0,
        crop_prob=0,
        min_tokens=16,
        max_tokens=1024,
        token_budget=4096,
        num_classes=10,
    )
    assert catalog.num_skipped_small == 1 and 0 not in catalog.eligible
    table[5, 4] = 10
    with pytest.raises(ValueError, match=r"sample 5 \(source id 5\) has label 10 outside \[0, 10\)"):
        SampleCatalog(
            table,
            seed=0,
            flip_prob=0,
            crop_prob=0,
            min_tokens=16,
            max_tokens=1024,
            token_budget=4096,
            num_classes=10,
        )
    table[5, 4] = 1
    with pytest.raises(ValueError, match=r"more than data.max_image_tokens=256"):
        SampleCatalog(
            table,
            seed=0,
            flip_prob=0,
            crop_prob=0,
            min_tokens=16,
            max_tokens=256,
            token_budget=4096,
            num_classes=10,
        )


def test_rank_with_too_few_images_gets_padding_only_micro_batches():
    table = size_table(40)
    table[:, 0], table[:, 1], table[:, 2], table[:, 3] = 32, 32, 0, 0  # 1024 tokens each
    plan = make_planner(table, batch=5, budget=1024).next_step(4)
    assert [len(bins) for bins in plan] == [2, 2, 2, 2]
    assert sum(1 for bins in plan for b in bins if not b) == 3
    pad = padding_batch(1000, 16, null_class=10)
    assert pad.num_images == 0 and pad.num_tokens == 1000 and pad.num_real_tokens == 0
    assert (pad.cu_seqlens[1:] - pad.cu_seqlens[:-1]).tolist() == [128] * 7 + [104]
    assert pad.max_seqlen == 128 and pad.labels.tolist() == [10] * 8 and pad.sample_ids.tolist() == [-1] * 8


def test_padding_tail_is_split_into_short_segments_so_its_attention_stays_linear():
    images = [torch.randn(r * c, 16) for r, c in [(16, 16), (8, 16), (5, 7)]]
    batch = pack_images(images, [(16, 16), (8, 16), (5, 7)], [1, 2, 3], [7, 8, 9], token_budget=1024)
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).tolist()
    assert lengths == [256, 128, 35] + [128] * 4 + [93]
    assert batch.num_images == 3 and batch.num_real_tokens == 419 and batch.max_seqlen == 256
    assert batch.labels.tolist() == [1, 2, 3] + [1000] * 5 and batch.sample_ids.tolist()[3:] == [-1] * 5
    assert batch.sizes.tolist()[3:] == [[1, 128]] * 4 + [[1, 93]]
    assert batch.pos[419 + 128 :].tolist() == [[0, j] for j in range(128)] * 3 + [[0, j] for j in range(93)]
    assert torch.equal(batch.tokens[:256], images[0]) and not batch.tokens[419:].any()


def test_data_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"data.path: set it to a dataset folder"):
        DataConfig()
    with pytest.raises(ValueError, match=r"^data.batch_mode: 'token' is not one of images, tokens$"):
        DataConfig(path="x", batch_mode="token")
    with pytest.raises(ValueError, match=r"data.token_budget=128: must hold the largest image"):
        DataConfig(path="x", token_budget=128)
    with pytest.raises(
        ValueError,
        match=r"^data.max_image_tokens: 512 is not one of 256, 1024; 256 for 256x256 images, 1024 for 512x512$",
    ):
        DataConfig(path="x", max_image_tokens=512, token_budget=4096)
    with pytest.raises(ValueError, match=r"data.flip_prob=1.5: must be a probability"):
        DataConfig(path="x", flip_prob=1.5)
    with pytest.raises(ValueError, match=r"data.path: data.remote='s3://b/d' needs a local cache folder"):
        DataConfig(remote="s3://b/d")
    val = DataConfig(path="x", val_path="y").validation()
    assert (val.path, val.flip_prob, val.shuffle) == ("y", 0.0, False)
