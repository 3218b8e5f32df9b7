"""Held-out loss during training (`train.val_every`): real processes (torchrun, gloo), the tiny model.

Two 3-step runs on the seeded training stream of `tests/helpers/train_worker.py`, on 2 ranks and on 1, scoring
a 12-image digits split every 2 steps and at the end. The logged numbers must be what
`run_validation` gives for the checkpoint's raw and EMA weights and must not depend on the number
of ranks. That validation leaves training bit-identical is checked by the kill/resume test of
test_train.py, whose interrupted run validates and whose reference does not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.train_runs import checkpoint_tensors, metric_records, model_weights, run, write_digits_split

pytestmark = pytest.mark.slow

COMMON = ["train.steps=3", "checkpoint.interval=2", "checkpoint.keep_last=0"]
VALIDATION = ["train.val_every=2", "train.val_max_images=10", "train.val_seed=5"]


@pytest.fixture(scope="module")
def val_split(tmp_path_factory) -> Path:
    return write_digits_split(tmp_path_factory.mktemp("val") / "digits_val")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, val_split) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    paths = {name: root / name for name in ("two", "one")}
    validation = [f"data.val_path={val_split}", *VALIDATION]
    run(paths["two"], 2, *COMMON, *validation)
    run(paths["one"], 1, *COMMON, *validation)
    return paths


def scored_records(run_dir: Path) -> dict[int, dict]:
    return {step: r for step, r in metric_records(run_dir).items() if "val_loss" in r}


def test_val_loss_is_logged_every_n_steps_and_at_the_end(runs):
    records = metric_records(runs["two"])
    assert sorted(records) == [1, 2, 3]
    assert sorted(scored_records(runs["two"])) == [2, 3]
    for step in (2, 3):
        record = records[step]
        assert record["val_images"] == 10  # train.val_max_images of the 12 in the split
        assert record["val_loss_ema"] != record["val_loss"]  # EMA decay 0.9999 lags the weights
        assert record["val_loss"] == pytest.approx(
            sum(value for key, value in record.items() if key.startswith("val_loss_t") and "ema" not in key)
            / 8
        )
    history = json.loads((runs["two"] / "history.json").read_text())
    assert [("val_loss" in r) for r in history] == [False, True, True]


def test_logged_val_loss_is_run_validation_of_the_checkpoint(runs, val_split):
    from fitscale.config.data import DataConfig
    from fitscale.models import build_model
    from fitscale.train.validation import ValidationSettings, run_validation, validation_batches

    data = DataConfig(path=str(val_split), val_path=str(val_split), num_classes=10, num_workers=0)
    batches = validation_batches(data, max_images=10)
    settings = ValidationSettings(seed=5)
    tensors = checkpoint_tensors(runs["two"], 2)
    logged = metric_records(runs["two"])[2]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other on a busy machine
    try:
        for section, key in (("model", "val_loss"), ("ema", "val_loss_ema")):
            model = build_model("tiny", attn_backend="reference")
            model.load_state_dict(model_weights(tensors, section))
            scored = run_validation(model, batches, settings)["val_loss"]
            # the same micro-batches, so the same fp32 per-image losses (measured equal under every
            # ATEN_CPU_CAPABILITY); 1e-6 allows their float64 sum another order and BLAS threading
            assert scored == pytest.approx(logged[key], rel=1e-6), key
    finally:
        torch.set_num_threads(threads)


def test_one_and_two_ranks_give_the_same_val_loss(runs):
    two, one = scored_records(runs["two"]), scored_records(runs["one"])
    assert sorted(one) == [2, 3]
    for step in (2, 3):
        for key in ("val_loss", "val_loss_ema", "val_loss_t0.062"):
            # fp32 per-image losses of other batch shapes: ~1e-7 each, their mean no worse (measured 8e-9)
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-6), (step, key)
