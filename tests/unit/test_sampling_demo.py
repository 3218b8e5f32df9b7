"""The demo's digit check: rendering a real digit and reading it back gives the classifier's input."""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits

from fitscale.data.sources import render_digit
from fitscale.sample_demo import digits_classifier, latent_to_digit


def test_reading_back_rendered_digits_recovers_them_at_any_aspect_ratio():
    digits = load_digits()
    classifier = digits_classifier()
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(digits.images), 200, replace=False)
    recovered, labels = [], []
    for index in chosen:
        rows, cols = (int(v) for v in rng.integers(4, 17, size=2))
        latent = render_digit(digits.images[index], rows, cols)
        back = latent_to_digit(latent)
        assert back.shape == (8, 8) and 0 <= back.min() and back.max() <= 16
        recovered.append(back.reshape(64))
        labels.append(digits.target[index])
    accuracy = (classifier.predict(np.stack(recovered)) == np.array(labels)).mean()
    assert accuracy >= 0.9, f"only {accuracy:.0%} of re-read real digits recognised"
