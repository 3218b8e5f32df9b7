"""The digits quality metric (fitscale.eval.digits_quality): its Frechet distance against the closed
form of two Gaussians, real digits scoring near 0 and bad samples far away, and its settings' errors."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

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
