"""REPA in training (train.repa): real ranks over gloo, the tiny FiT and real timm encoders whose
random weights are written to a local file (nothing is downloaded).

The pixels of the worker's seeded images (tests/helpers/train_worker.py) are written as a
dataset's pixel side files (tests/helpers/repa.py); `data.path` points at them. Tolerances as in
test_train_deepspeed.py: other reduction orders move losses by fp32 rounding (about 1e-7 relative), far below rel 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.repa import (
    TINY_VIT,
    assert_projector_checkpointed_not_exported,
    encoder_file,
    history,
    repa_overrides,
    write_worker_pixels,
)
from helpers.train_runs import checkpoint_tensors, metric_records, run, write_digits_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("repa")
    data = write_worker_pixels(root / "data", images=8 * 4)
    weights = encoder_file(root / "tiny.safetensors", "vit_tiny_patch16_224", **TINY_VIT)
    return root, repa_overrides(data, weights)


def test_one_and_two_ranks_give_the_same_losses_and_the_projector_is_checkpointed_not_exported(
    setup, tmp_path
):
    root, repa = setup
    single, double = tmp_path / "single", tmp_path / "double"
    run(single, 1, *repa, "train.steps=3", "checkpoint.interval=0", "checkpoint.save_at_end=false")
    # two ranks with activation checkpointing of every block: recomputation leaves the numbers alone
    run(double, 2, *repa, "train.steps=3", "checkpoint.keep_last=0", "parallel.activation_checkpointing=full")
    for one, two in zip(history(single), history(double), strict=True):
        assert two == pytest.approx(one, rel=1e-5)
    assert all(-1.0 <= r <= 1.0 for _, r, _ in history(single))
    records = metric_records(double)
    assert records[3]["repa_loss"] == history(double)[2][1] and records[3]["encoder_s"] > 0
    assert_projector_checkpointed_not_exported(double, 3, tmp_path / "w.safetensors")


def test_a_repa_run_starts_from_a_plain_runs_checkpoint_with_its_ema(setup, tmp_path):
    """`train.init_from` a plain run (weights and EMA, no projector): the network's weights and EMA
    come from it, the projector and its EMA start from their initialisation."""
    _, repa = setup
    plain, aligned = tmp_path / "plain", tmp_path / "aligned"
    run(plain, 1, "train.steps=2", "model.overrides.class_dropout_prob=0.0")
    run(aligned, 2, *repa, f"train.init_from={plain}", "train.steps=1", "checkpoint.keep_last=0")
    start, after = checkpoint_tensors(plain, 2), checkpoint_tensors(aligned, 1)
    assert any(key.startswith("ema.params.hidden_head.") for key in after)
    moved = [k for k in start if k.startswith("ema.params.") and not torch.equal(start[k], after[k])]
    assert moved, "the EMA did not start from the plain run's"  # one step with decay < 1 moves it a little
    for key in (k for k in start if k.startswith("ema.params.")):
        torch.testing.assert_close(after[key], start[key], rtol=0, atol=0.05)


def test_repa_run_killed_and_resumed_is_bit_identical(setup, tmp_path):
    root, repa = setup
    # Alignment off from step 3 on (train.repa.until_step): the resumed run turns it off as the reference did.
    common = [
        *repa,
        "train.steps=4",
        "checkpoint.interval=2",
        "checkpoint.keep_last=0",
        "train.repa.until_step=3",
    ]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run(reference, 2, *common)
    run(resumed, 2, *common, die_at=3, expect_kill=True)
    run(resumed, 2, *common, history="history-resumed.json")
    assert history(resumed, "history-resumed.json") == history(reference)[2:]
    assert [r is not None for _, r, _ in history(reference)] == [True, True, True, False]
    expected, actual = checkpoint_tensors(reference, 4), checkpoint_tensors(resumed, 4)
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), f"{key} differs after resuming"


def test_dinov2_b_from_a_local_file_trains_a_step_under_fsdp_and_zero3_alike(setup, tmp_path):
    """DINOv2-B (86.6 M parameters, random weights in a local file) on each image's own grid, 14-pixel
    patches from 16 stored pixels per token: one 2-rank step under FSDP2 and under DeepSpeed ZeRO-3
    gives the same flow and alignment losses and gradient norm, and the same held-out losses of the
    weights and the EMA (validation runs the network without the projector)."""
    root, _ = setup
    weights = encoder_file(root / "dinov2_b.safetensors", "vit_base_patch14_dinov2")
    data = write_worker_pixels(root / "data16", images=8, pixels_per_token=16)
    repa = repa_overrides(data, weights, "vit_base_patch14_dinov2", args={})
    validation = [f"data.val_path={write_digits_split(root / 'val')}", "train.val_every=1"]  # weights and EMA
    once = ["train.steps=1", "checkpoint.interval=0", "checkpoint.save_at_end=false", *validation]
    run(tmp_path / "fsdp", 2, *repa, *once)
    run(tmp_path / "zero3", 2, *repa, *once, "parallel.backend=deepspeed", "parallel.zero_stage=3")
    ((loss, alignment, norm),) = history(tmp_path / "fsdp")
    assert np.isfinite(loss) and -1.0 <= alignment <= 1.0 and norm > 0
    assert history(tmp_path / "zero3")[0] == pytest.approx((loss, alignment, norm), rel=1e-5)
    scores = [metric_records(tmp_path / name)[1] for name in ("fsdp", "zero3")]
    for key in ("val_loss", "val_loss_ema"):
        assert scores[1][key] == pytest.approx(scores[0][key], rel=1e-5), key


def test_compiled_blocks_on_two_ranks_give_the_losses_of_one_eager_rank(setup, tmp_path):
    """`parallel.compile` (per block, static padded shapes) with the hidden state taken after block 1."""
    _, repa = setup
    common = [
        *repa,
        "train.steps=2",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "data.pad_to_budget=true",
    ]
    run(tmp_path / "eager", 1, *common, pad_to=128)
    run(tmp_path / "compiled", 2, *common, "parallel.compile=true", pad_to=128)
    for eager, compiled in zip(history(tmp_path / "eager"), history(tmp_path / "compiled"), strict=True):
        assert compiled == pytest.approx(eager, rel=1e-5)


def test_a_bf16_repa_step_under_fsdp2_gives_finite_losses_near_fp32(setup, tmp_path):
    """`parallel.param_dtype=bf16` on CPU: FSDP2 gathers the network and the projector in bf16 while the
    frozen encoder stays fp32; the alignment loss of bf16 hidden states against fp32 features is
    finite and within bf16's rounding of the fp32 run's (the first step's flow loss is the same: the
    zero-initialised final layer outputs zeros in either dtype)."""
    _, repa = setup
    once = [*repa, "train.steps=2", "checkpoint.interval=0", "checkpoint.save_at_end=false"]
    run(tmp_path / "fp32", 2, *once)
    run(tmp_path / "bf16", 2, *once, "parallel.param_dtype=bf16")
    for full, half in zip(history(tmp_path / "fp32"), history(tmp_path / "bf16"), strict=True):
        assert all(np.isfinite(half)) and -1.0 <= half[1] <= 1.0
        assert half != full, "bf16 gave the fp32 numbers: the compute dtype was not applied"
        # flow loss and gradient norm to bf16's rounding; the cosine near 0 to 0.01 absolute
        assert (half[0], half[2]) == pytest.approx((full[0], full[2]), rel=0.01)
        assert half[1] == pytest.approx(full[1], abs=0.01)
