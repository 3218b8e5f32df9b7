"""model.objective=ddpm (FiT v1) in training over real gloo ranks: the tiny FiT with learned variances
on the worker's seeded packed steps (tests/helpers/train_worker.py).

Each image draws its timestep index and noise from its own seed, so one and two ranks train the same
steps; other reduction orders move losses by fp32 rounding (about 1e-7 relative), far below 1e-5.
"""

from __future__ import annotations

import pytest
from helpers.train_runs import losses, metric_records, run

pytestmark = pytest.mark.slow

DDPM = ["model.overrides.objective=ddpm", "model.overrides.learn_sigma=true", "train.flow.timesteps=uniform"]


def test_one_and_two_ranks_give_the_same_ddpm_losses_and_terms(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    common = [*DDPM, "train.steps=3", "checkpoint.interval=0", "checkpoint.save_at_end=false"]
    run(single, 1, *common)
    run(double, 2, *common)
    assert losses(double) == pytest.approx(losses(single), rel=1e-5)
    one, two = metric_records(single), metric_records(double)
    for step in (1, 2, 3):
        assert two[step]["mse"] == pytest.approx(one[step]["mse"], rel=1e-5)
        assert two[step]["vb"] == pytest.approx(one[step]["vb"], rel=1e-5)
        assert one[step]["loss"] == pytest.approx(one[step]["mse"] + one[step]["vb"], rel=1e-6)
