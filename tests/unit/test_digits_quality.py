"""The digits quality metric (fitscale.eval.digits_quality): its Frechet distance against the closed
form of two Gaussians, real digits scoring near 0 and bad samples far away, and its settings' errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fitscale.errors import UserError
from fitscale.eval.adm import FIDStatistics
from fitscale.eval.digits_quality import (
    QualitySettings,
    digit_features,
    features_frechet,
    reference_statistics,
    score_digits,
)


def axis_points(mu: np.ndarray, half_widths: np.ndarray) -> np.ndarray:
    """2D points mu +- a_i e_i: their mean is exactly mu and np.cov (N - 1) exactly diag(2 a_i^2 / (2D - 1))."""
    steps = np.diag(half_widths)
    return np.concatenate([mu + steps, mu - steps])


def test_frechet_distance_matches_the_closed_form_of_two_gaussians():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, -1.0, 1.0])
    a = np.array([1.0, 2.0, 0.5])
    points = axis_points(mu1, a)
    variance1 = 2 * a**2 / (2 * len(a) - 1)
    variance2 = np.array([4.0, 0.25, 1.0])
    reference = FIDStatistics(mu2, np.diag(variance2))
    # |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), the last a sum of square roots for diagonal S
    expected = ((mu1 - mu2) ** 2).sum() + (variance1 + variance2 - 2 * np.sqrt(variance1 * variance2)).sum()
    assert features_frechet(points, reference) == pytest.approx(expected, rel=1e-9)
    same = FIDStatistics(mu1, np.diag(variance1))
    assert features_frechet(points, same) == pytest.approx(0.0, abs=1e-9)


def test_real_digits_score_near_zero_and_noise_or_collapse_far_from_it():
    digits = load_digits()
    grids = QualitySettings().grids
    chosen = np.random.default_rng(0).permutation(len(digits.images))[:160]
    real = score_digits(digits.images[chosen], digits.target[chosen], grids)
    assert real["recognised"] == 1.0
    # 160 real digits against the 1,797 rendered and decoded at the grids: only sampling noise
    assert real["frechet"] < 2.0
    noise = np.random.default_rng(1).uniform(0, 16, (160, 8, 8))
    assert score_digits(noise, digits.target[chosen], grids)["frechet"] > 20 * real["frechet"]
    # one digit per class repeated: perfectly recognised, but no diversity, which Frechet sees
    collapsed = np.repeat(digits.images[:10], 16, axis=0)
    collapsed_score = score_digits(collapsed, np.repeat(digits.target[:10], 16), grids)
    assert collapsed_score["recognised"] == 1.0
    assert collapsed_score["frechet"] > 4 * real["frechet"]


def test_reference_is_the_real_digits_through_the_same_decoder():
    statistics = reference_statistics(((6, 6), (4, 8)))
    features = digit_features(load_digits().images[:5])
    assert statistics.mu.shape == (features.shape[1],) and statistics.sigma.shape == (features.shape[1],) * 2
    assert 32 <= features.shape[1] <= 64 and (features >= 0).all()


def test_settings_refuse_bad_values_in_one_line():
    with pytest.raises(ValueError, match=r"^digits quality: per_class=0, steps=12, cfg_scale=6.0: need"):
        QualitySettings(per_class=0)
    with pytest.raises(ValueError, match=r"^sweep 'x': unknown digits_quality keys \['per_clas'\]; known: "):
        QualitySettings.from_dict({"per_clas": 2}, "sweep 'x'")
    assert QualitySettings.from_dict({"grids": [[4, 8]]}, "x").grids == ((4, 8),)
    with pytest.raises(ValueError, match="at least 2 samples"):
        features_frechet(np.zeros((1, 3)), FIDStatistics(np.zeros(3), np.eye(3)))


@pytest.fixture
def run_without_ema(tmp_path):
    """A run folder whose one checkpoint holds the raw weights of a width-16 tiny FiT and no EMA."""
    import torch.distributed.checkpoint as dcp
    import yaml

    from fitscale.checkpoint.layout import write_metadata
    from fitscale.models import build_model

    overrides = {"hidden_size": 16, "num_heads": 2, "adaln_lora_rank": 4}
    model = build_model("tiny", **overrides)
    step = tmp_path / "run" / "checkpoints" / "step-1"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step), no_dist=True)
    write_metadata(step, {"step": 1})
    (tmp_path / "run" / "config.yaml").write_text(
        yaml.safe_dump({"model": {"name": "tiny", "overrides": overrides}})
    )
    return tmp_path / "run"


MISSING_EMA = (
    "{step} has no usable EMA weights (key `ema`): RuntimeError: Missing key in checkpoint state_dict: "
    "ema.params.x_embedder.proj.weight. (rank 0); {hint}"
)


def test_a_checkpoint_without_an_ema_names_the_setting_that_scores_the_raw_weights(run_without_ema, capsys):
    from fitscale.cli import main
    from fitscale.eval.digits_quality import digits_quality

    step = run_without_ema / "checkpoints" / "step-1"
    settings = QualitySettings(per_class=1, grids=((4, 4),), steps=1)
    with pytest.raises(UserError) as error:
        digits_quality(run_without_ema, settings)
    hint = "set the digits quality settings' `ema: false` to score the raw weights"
    assert str(error.value) == MISSING_EMA.format(step=step, hint=hint)
    assert digits_quality(run_without_ema, dataclasses.replace(settings, ema=False)).images == 10
    # `fitscale sample` names its own switch
    sample = ["sample", str(run_without_ema), "--height", "64", "--width", "64", "--steps", "2", "--out"]
    assert main([*sample, str(run_without_ema.parent / "ema")]) == 2
    line = MISSING_EMA.format(step=step, hint="pass --raw to use the raw weights")
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"fitscale sample: error: {line}"
    assert main([*sample, str(run_without_ema.parent / "raw"), "--raw"]) == 0
