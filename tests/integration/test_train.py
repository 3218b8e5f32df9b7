"""Acceptance runs of the Trainer: real processes (torchrun, gloo), the tiny model, a few steps.

One uninterrupted 2-rank FSDP run (`reference`, shared by the module) is the baseline that the
kill/resume, world-size and activation-checkpointing/compile tests compare against, so each test
launches only the runs it adds. Micro-batches are padded to a fixed token count, as compiled
training needs, so every run here takes the same shapes and draws the same label dropout.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from helpers.train_runs import checkpoint_tensors, losses, model_weights, run, write_digits_split

pytestmark = pytest.mark.slow

PAD = {"pad_to": 128}  # a micro-batch holds at most 4 images (1 rank) of at most 25 tokens
REFERENCE = ["train.steps=6", "checkpoint.interval=2", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """6 steps on 2 ranks with label dropout and EMA, a checkpoint every 2 steps (all kept)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run(run_dir, 2, *REFERENCE, **PAD)
    return run_dir


def test_fsdp_run_killed_and_resumed_is_bit_identical(reference, tmp_path):
    """The interrupted run also scores a held-out split every 2 steps (`train.val_every`) and the
    reference does not: validation must leave the weights, optimizer, EMA and RNG streams as they were."""
    die_at = random.Random().choice([3, 4, 5])
    interrupted = tmp_path / "interrupted"
    validation = [f"data.val_path={write_digits_split(tmp_path / 'val')}", "train.val_every=2"]
    run(interrupted, 2, *REFERENCE, *validation, die_at=die_at, expect_kill=True, **PAD)
    resumed_from = die_at - die_at % 2
    assert (interrupted / "checkpoints" / f"step-{resumed_from}").is_dir()
    assert not (interrupted / "checkpoints" / f"step-{resumed_from + 2}").exists()
    run(interrupted, 2, *REFERENCE, *validation, history="history-resumed.json", **PAD)
    expected = checkpoint_tensors(reference, 6)
    actual = checkpoint_tensors(interrupted, 6)
    for section in ("model.", "optimizer.", "ema.", "rng.", "data."):
        assert any(key.startswith(section) for key in expected), section
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), f"{key} differs after resuming from a kill at step {die_at}"
    assert losses(interrupted, "history-resumed.json") == losses(reference)[resumed_from:]
    resumed = json.loads((interrupted / "history-resumed.json").read_text())
    assert [r["step"] for r in resumed if "val_loss" in r] == list(range(resumed_from + 2, 7, 2))
    records = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r.get("event") == "config_changed"]


@pytest.mark.parametrize("nproc", [1, 4])
def test_checkpoint_of_two_ranks_resumes_on_other_world_sizes(reference, tmp_path, nproc):
    resumed = tmp_path / f"on{nproc}"
    shutil.copytree(reference / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    run(resumed, nproc, "train.steps=3", "checkpoint.interval=2", history="history-resumed.json", **PAD)
    history = json.loads((resumed / "history-resumed.json").read_text())
    assert [record["step"] for record in history] == [3]
    assert history[0]["images"] == 8  # the data continues with step 3's global batch
    before = model_weights(checkpoint_tensors(reference, 2))
    after = model_weights(checkpoint_tensors(resumed, 3))
    assert before.keys() == after.keys()
    assert not torch.equal(before["x_embedder.proj.weight"], after["x_embedder.proj.weight"]), "no training"


@pytest.mark.parametrize(
    "variant",
    [
        ["parallel.activation_checkpointing=full"],
        ["parallel.activation_checkpointing=every", "parallel.ac_every=2", "parallel.compile=true"],
    ],
    ids=["ac-full", "ac-every+compile"],
)
def test_activation_checkpointing_and_compile_give_the_losses_of_the_plain_run(reference, tmp_path, variant):
    common = ["train.steps=3", "checkpoint.interval=0", "checkpoint.save_at_end=false"]
    run(tmp_path / "run", 2, *common, *variant, "data.pad_to_budget=true", **PAD)
    expected = losses(reference)[:3]
    if "parallel.compile=true" not in variant:  # recomputing a forward repeats its arithmetic: exact
        assert losses(tmp_path / "run") == expected
    else:  # inductor's fused kernels, vectorised for the CPU at hand, round differently: ~1e-7 a loss
        assert losses(tmp_path / "run") == pytest.approx(expected, rel=1e-5)


def test_explicit_fsdp_prefetch_changes_the_schedule_not_the_numbers(reference, tmp_path):
    """Prefetching two blocks ahead in forward and backward: the same all-gathers, issued earlier."""
    run(tmp_path / "run", 2, *REFERENCE, "train.steps=2", "parallel.fsdp_prefetch=2", **PAD)
    assert losses(tmp_path / "run") == losses(reference)[:2]
    expected, actual = checkpoint_tensors(reference, 2), checkpoint_tensors(tmp_path / "run", 2)
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), f"{key} differs with parallel.fsdp_prefetch=2"


def test_same_images_split_differently_give_the_same_loss_and_update(tmp_path):
    """Every random draw of a step is per image, label dropout included (noise, timestep and the
    dropped labels come from the image's own seed), so the split changes only the order of fp32
    sums. Dropout is raised to 0.5 so that many labels are dropped: a dropout drawn per rank would
    move the modulation weights by about 1e-3 here. Tolerances: two AdamW steps at lr 1e-3 move
    each weight by up to about 2e-3; reduction order differs by at most about 1e-7, which Adam's
    g / (sqrt(v) + eps) passes through nearly unchanged; atol 1e-6 is 0.05% of those two steps,
    far below what one differently dropped label or one missing micro-batch does (1e-4 and more)."""
    common = [
        "train.steps=2",
        "checkpoint.interval=2",
        "optim.ema.enabled=false",
        "model.overrides.class_dropout_prob=0.5",
    ]
    run(tmp_path / "interleaved", 2, *common, split="interleave", micro_batches=2)
    run(tmp_path / "uneven", 2, *common, split="contiguous", first=3, micro_batches=1)
    run(tmp_path / "one_rank", 1, *common, micro_batches=3)
    reference = losses(tmp_path / "interleaved")
    weights = checkpoint_tensors(tmp_path / "interleaved", 2)
    for name in ("uneven", "one_rank"):
        assert losses(tmp_path / name) == pytest.approx(reference, rel=1e-5), name
        other = checkpoint_tensors(tmp_path / name, 2)
        for key, tensor in weights.items():
            if key.startswith("model."):
                torch.testing.assert_close(other[key], tensor, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
