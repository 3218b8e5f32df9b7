"""Sample quality of a digits run, comparable across objectives (flow, DDPM) and model sizes.

Validation losses of an epsilon and a velocity model measure different things; samples do not. A
checkpoint draws a fixed budget, `per_class` digits of every class at every grid of `grids`
(tokens, rows x cols), with fixed seeds and the given sampler, steps and guidance scale. Each
latent is decoded to an 8x8 digit (fitscale.sample.demo.latent_to_digit) and scored twice:

- `recognised`: the fraction the demo's classifier (an RBF SVM on all 1,797 real digits,
  `digits_classifier`) assigns to the class it was sampled for. Higher is better; it measures
  conditioning and legibility, not diversity.
- `frechet`: the Frechet distance (fitscale.eval.adm.frechet_distance, ADM's formula) between
  Gaussians fitted to the samples' features and to the real digits' features. Lower is better;
  it sees diversity too: a model that draws one good "3" per class scores well on `recognised`
  and badly here.

The features are the 64 hidden ReLU units of a small MLP (`feature_network`: scikit-learn's
MLPClassifier, 64 hidden units, random_state 0, trained on all real digits scaled to [0, 1], 97-99%
accurate). The SVM has no hidden layer to read features from (its decision values are 45 pairwise
margins folded into 10 votes), and a network's penultimate layer is what FID uses of Inception.
The reference is the 1,797 real digits rendered at each grid of `grids` as the dataset renders
them (fitscale.data.sources.render_digit) and decoded by the same `latent_to_digit`, so the
decoder's resampling is on both sides and real digits score close to 0 (`reference_statistics`).

Both networks train in about a second and are cached per process. Their weights come from
scikit-learn's BLAS on this machine: compare numbers measured on one machine and one library
version (results record `sklearn`).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fitscale.checkpoint.layout import find_checkpoint
from fitscale.data.sources import render_digit
from fitscale.errors import UserError
from fitscale.eval.adm import FIDStatistics, compute_statistics, frechet_distance
from fitscale.sample.demo import digits_classifier, draw_digits, latent_to_digit
from fitscale.sample.generate import load_sampling_model, training_ddpm

FEATURE_UNITS = 64  # hidden units of the feature network: the dimension of the Frechet distance


@dataclass(frozen=True)
class QualitySettings:
    """The fixed sample budget and sampler of the metric; every checkpoint compared must use the same."""

    per_class: int = 4
    """Samples of every class at every grid: 10 classes x 4 grids x 4 = 160 images by default."""
    grids: tuple[tuple[int, int], ...] = ((6, 6), (4, 8), (8, 4), (8, 8))
    """(rows, cols) in tokens; the default is `demo_grids(4, 8)`, the sizes recipes/demo.yaml trains on."""
    sampler: str = "heun"
    """Any `fitscale sample --sampler`; a model of another objective needs its own (e.g. ddpm)."""
    steps: int = 12
    """Steps of a grid sampler (ignored by adaptive ones)."""
    cfg_scale: float = 6.0
    """Classifier-free guidance scale (recipes/demo.yaml samples at 6)."""
    seed: int = 0
    """Seed of every image's noise: the same images for every checkpoint."""
    ema: bool = True
    """Score the EMA weights (else the raw weights)."""

    def __post_init__(self) -> None:
        if self.per_class < 1 or self.steps < 1 or self.cfg_scale < 0:
            raise UserError(
                f"digits quality: per_class={self.per_class}, steps={self.steps}, cfg_scale={self.cfg_scale}: "
                "need per_class >= 1, steps >= 1, cfg_scale >= 0"
            )
        if not self.grids or any(len(g) != 2 or min(g) < 1 for g in self.grids):
            raise UserError(f"digits quality: grids={list(self.grids)}: need a list of [rows, cols] >= 1")
        object.__setattr__(self, "grids", tuple(tuple(int(v) for v in g) for g in self.grids))

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str) -> QualitySettings:
        """Settings from a YAML mapping (a sweep spec's `digits_quality:`); UserError names `where`
        and an unknown key."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise UserError(
                f"{where}: unknown digits_quality keys {unknown}; known: {sorted(cls.__dataclass_fields__)}"
            )
        grids = values.get("grids")
        return cls(**{**values, **({"grids": tuple(map(tuple, grids))} if grids is not None else {})})


@dataclass
class QualityResult:
    """The metric of one checkpoint (see the module docstring), with what produced it."""

    recognised: float
    """Fraction of samples the real-digits SVM assigns to their class, in [0, 1]."""
    frechet: float
    """Frechet distance of the samples' 64-d MLP features to the real digits'; >= 0, lower is better."""
    images: int
    step: int
    """Training step of the checkpoint scored."""
    settings: dict[str, Any] = field(default_factory=dict)
    sklearn: str = ""


@functools.lru_cache(maxsize=1)
def feature_network():
    """scikit-learn MLPClassifier (64 ReLU units, random_state 0) on all real digits scaled to [0, 1]."""
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    network = MLPClassifier(hidden_layer_sizes=(FEATURE_UNITS,), max_iter=300, random_state=0)
    with warnings.catch_warnings():  # 300 epochs fit the training set; the last decimals do not matter
        warnings.simplefilter("ignore", ConvergenceWarning)
        return network.fit(digits.data / 16.0, digits.target)


@functools.lru_cache(maxsize=1)
def _live_units() -> np.ndarray:
    """Indices of the hidden units that fire on some real digit (a dead unit has zero variance on
    every set, which only makes the covariance product singular)."""
    from sklearn.datasets import load_digits

    network = feature_network()
    hidden = load_digits().data / 16.0 @ network.coefs_[0] + network.intercepts_[0]
    return np.flatnonzero(hidden.max(axis=0) > 0)


def digit_features(digits: np.ndarray) -> np.ndarray:
    """(N, 8, 8) or (N, 64) digits on the 0..16 scale -> (N, D) float64 hidden activations
    ReLU(x W1 + b1) of `feature_network`, D <= 64 its units that fire on some real digit."""
    network = feature_network()
    x = np.asarray(digits, dtype=np.float64).reshape(len(digits), 64) / 16.0
    live = _live_units()
    return np.maximum(x @ network.coefs_[0][:, live] + network.intercepts_[0][live], 0.0)


def features_frechet(sample: np.ndarray, reference: FIDStatistics) -> float:
    """Frechet distance of (N, D) sample features (mean and covariance, N >= 2) to `reference`.

    A unit that never fires on the samples makes the covariance product singular; scipy warns and
    the square root is still right (ADM's eps fallback covers a non-finite one), so the warning is
    silenced."""
    import warnings

    from scipy.linalg import LinAlgWarning

    if len(sample) < 2:
        raise UserError(f"the digits Frechet distance needs at least 2 samples, got {len(sample)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)
        return frechet_distance(compute_statistics(sample), reference)


@functools.lru_cache(maxsize=8)
def reference_statistics(grids: tuple[tuple[int, int], ...]) -> FIDStatistics:
    """Feature statistics of the 1,797 real digits rendered at every grid of `grids` and decoded."""
    from sklearn.datasets import load_digits

    images = load_digits().images
    decoded = [latent_to_digit(render_digit(image, rows, cols)) for rows, cols in grids for image in images]
    return compute_statistics(digit_features(np.stack(decoded)))


def score_digits(digits: np.ndarray, labels: np.ndarray, grids: tuple[tuple[int, int], ...]) -> dict:
    """`recognised` and `frechet` of (N, 8, 8) decoded digits sampled for `labels` (N,)."""
    flat = np.asarray(digits).reshape(len(digits), 64)
    recognised = float((digits_classifier().predict(flat) == np.asarray(labels)).mean())
    return {
        "recognised": recognised,
        "frechet": features_frechet(digit_features(flat), reference_statistics(grids)),
    }


def digits_quality(checkpoint: str | Path, settings: QualitySettings | None = None) -> QualityResult:
    """The metric of a run folder's newest checkpoint or of one `step-N` folder (raw or EMA weights).

    FileNotFoundError names a path without a complete checkpoint; the sampler's own ValueError names
    a sampler that does not exist or does not fit the model."""
    import sklearn

    settings = settings or QualitySettings()
    step_dir = find_checkpoint(checkpoint)
    model = load_sampling_model(
        step_dir,
        ema=settings.ema,
        raw_hint="set the digits quality settings' `ema: false` to score the raw weights",
    )
    items, _, latents = draw_digits(
        model,
        settings.grids,
        settings.per_class,
        settings.sampler,
        settings.steps,
        settings.cfg_scale,
        settings.seed,
        training_ddpm(step_dir) if settings.sampler == "ddpm" else None,
    )
    digits = np.stack([latent_to_digit(latent) for latent in latents])
    scores = score_digits(digits, np.array([item.label for item in items]), settings.grids)
    return QualityResult(
        recognised=scores["recognised"],
        frechet=scores["frechet"],
        images=len(items),
        step=int(step_dir.name.split("-")[-1]),
        settings=asdict(settings),
        sklearn=sklearn.__version__,
    )
