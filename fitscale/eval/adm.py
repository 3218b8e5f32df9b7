"""The metrics of OpenAI's ADM evaluation suite, computed from Inception features exactly as
openai/guided-diffusion `evaluations/evaluator.py` (commit 1b61a43) computes them.

Every constant below is that file's: the Frechet distance of `FIDStatistics.frechet_distance`
(scipy's `sqrtm` with `disp=False`, the `eps = 1e-6` diagonal offset when the product is singular,
the 1e-3 tolerance on the imaginary diagonal), `compute_statistics` (mean and `np.cov(rowvar=False)`),
`compute_inception_score` (splits of 5000 consecutive images), and `ManifoldEstimator` as the
`Evaluator` builds it (`row_batch_size = col_batch_size = 10000`, `nhood_sizes = (3,)`,
`clamp_to_percentile = None`: the class accepts a percentile, the evaluator never passes one), with
`DistanceBlock`'s pairwise squared distances in float16 and a float32 fallback for a block that is
not finite.

The one choice ADM leaves to its TensorFlow kernels is how float16 sums are accumulated. The graph
squares the float16 features elementwise (`tf.square`, each square rounded to float16, overflowing
to inf past 255.9), then sums them; here each squared norm and each inner product is accumulated in
float32 and rounded to float16 (what a GPU's float16 reduction and GEMM do under TensorFlow's
defaults), then `max(|u|^2 - 2 u.v + |v|^2, 0)` is evaluated in float16, each operation rounded, as
in the graph.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg

from fitscale.errors import UserError

IS_SPLIT_SIZE = 5000  # compute_inception_score(split_size=5000)
FID_EPS = 1e-6  # frechet_distance(eps=1e-6)
ROW_BATCH_SIZE = 10000  # ManifoldEstimator(row_batch_size=10000)
COL_BATCH_SIZE = 10000  # ManifoldEstimator(col_batch_size=10000)
NHOOD_SIZES = (3,)  # ManifoldEstimator(nhood_sizes=(3,))
CLAMP_TO_PERCENTILE = None  # ManifoldEstimator(clamp_to_percentile=None): Evaluator passes none
REALISM_EPS = 1e-5  # ManifoldEstimator(eps=1e-5), used by `evaluate` (realism score), not by P/R


@dataclass
class FIDStatistics:
    """Mean (D,) and covariance (D, D) of a feature set; float64 when computed here."""

    mu: np.ndarray
    sigma: np.ndarray


def compute_statistics(activations: np.ndarray) -> FIDStatistics:
    """ADM's `compute_statistics`: the mean and `np.cov(rowvar=False)` (float64) of (N, D) features."""
    return FIDStatistics(np.mean(activations, axis=0), np.cov(activations, rowvar=False))


def statistics_from_sums(count: int, total: np.ndarray, outer: np.ndarray) -> FIDStatistics:
    """The same mean and unbiased covariance from float64 sums over N images: `total` = sum x (D,),
    `outer` = sum x x^T (D, D). Sums add across ranks and parts, so a set never has to be in memory
    at once. ValueError for fewer than 2 images (np.cov's N - 1)."""
    if count < 2:
        raise UserError(f"FID statistics need at least 2 images, got {count}")
    mu = total / count
    sigma = (outer - count * np.outer(mu, mu)) / (count - 1)
    return FIDStatistics(mu, sigma)


def frechet_distance(sample: FIDStatistics, reference: FIDStatistics, eps: float = FID_EPS) -> float:
    """ADM's `FIDStatistics.frechet_distance` (sample.frechet_distance(reference)), line for line.

    Raises ValueError for different dimensions or a square root with an imaginary diagonal beyond
    1e-3 (ADM's assertion and error)."""
    mu1, sigma1 = np.atleast_1d(sample.mu), np.atleast_2d(sample.sigma)
    mu2, sigma2 = np.atleast_1d(reference.mu), np.atleast_2d(reference.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(
            f"the sample's statistics {mu1.shape}/{sigma1.shape} and the reference's {mu2.shape}/{sigma2.shape} "
            "have different dimensions: was the reference built with another network?"
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():  # SciPy >= 1.16 deprecates `disp`; ADM passes it, the result is the same
        warnings.simplefilter("ignore", DeprecationWarning)
        covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
            stacklevel=2,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"Imaginary component {np.max(np.abs(covmean.imag))} in the FID's matrix square root"
            )
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(softmax: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's `compute_inception_score` from the (N, classes) softmax: the mean over consecutive
    splits of `split_size` images of exp(mean KL(p(y|x) || p(y)))."""
    scores = []
    for i in range(0, len(softmax), split_size):
        part = softmax[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _squared_norms_fp16(x16: np.ndarray) -> np.ndarray:
    """(N,) float16 squared norms of (N, D) float16 rows: each square rounded to float16 (the graph's
    tf.square on float16), summed in float32, the sum rounded to float16."""
    return np.sum(np.square(x16).astype(np.float32), 1).astype(np.float16)


def _pairwise_fp16(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    u16, v16 = u.astype(np.float16), v.astype(np.float16)
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite block is computed again in float32
        norm_u = _squared_norms_fp16(u16).reshape(-1, 1)
        norm_v = _squared_norms_fp16(v16).reshape(1, -1)
        product = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
        return np.maximum(norm_u - np.float16(2) * product + norm_v, np.float16(0))


def _pairwise_fp32(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    u, v = u.astype(np.float32), v.astype(np.float32)
    norm_u = np.sum(np.square(u), 1).reshape(-1, 1)
    norm_v = np.sum(np.square(v), 1).reshape(1, -1)
    return np.maximum(norm_u - 2 * (u @ v.T) + norm_v, np.float32(0))


def pairwise_distances(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ADM's `DistanceBlock.pairwise_distances`: (len(u), len(v)) squared Euclidean distances,
    float32, computed in float16 unless a value is not finite there (then in float32)."""
    block = _pairwise_fp16(u, v)
    if np.isfinite(block).all():
        return block.astype(np.float32)
    return _pairwise_fp32(u, v)


def manifold_radii(features: np.ndarray) -> np.ndarray:
    """ADM's `ManifoldEstimator.manifold_radii`: (N, 1) float32 squared distance of each feature
    vector to its k-th nearest neighbour (k = 3, itself not counted), in 10000-row blocks."""
    num = len(features)
    radii = np.zeros([num, len(NHOOD_SIZES)], dtype=np.float32)
    distances = np.zeros([min(ROW_BATCH_SIZE, num), num], dtype=np.float32)
    for begin1 in range(0, num, ROW_BATCH_SIZE):
        end1 = min(begin1 + ROW_BATCH_SIZE, num)
        rows = features[begin1:end1]
        for begin2 in range(0, num, COL_BATCH_SIZE):
            end2 = min(begin2 + COL_BATCH_SIZE, num)
            distances[0 : end1 - begin1, begin2:end2] = pairwise_distances(rows, features[begin2:end2])
        kth = max(NHOOD_SIZES)
        part = np.partition(distances[0 : end1 - begin1, :], kth, axis=1)
        radii[begin1:end1, :] = part[:, list(NHOOD_SIZES)]
    if CLAMP_TO_PERCENTILE is not None:  # pragma: no cover - ADM's evaluator never clamps
        max_distances = np.percentile(radii, CLAMP_TO_PERCENTILE, axis=0)
        radii[radii > max_distances] = 0
    return radii


def precision_recall(reference: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
    """ADM's `compute_prec_recall` (ManifoldEstimator.evaluate_pr) of (N1, 2048) reference and
    (N2, 2048) sample pool features: precision = share of samples inside some reference's k-NN ball,
    recall = share of reference images inside some sample's ball. ValueError when either set has
    no more than k images (no k-th neighbour)."""
    k = max(NHOOD_SIZES)
    for name, features in (("reference", reference), ("sample", sample)):
        if len(features) <= k:
            raise UserError(
                f"precision/recall need more than k={k} images in the {name} batch (the k-th nearest "
                f"neighbour), got {len(features)}"
            )
    radii_1, radii_2 = manifold_radii(reference), manifold_radii(sample)
    status_1 = np.zeros([len(reference), radii_2.shape[1]], dtype=bool)
    status_2 = np.zeros([len(sample), radii_1.shape[1]], dtype=bool)
    for begin_1 in range(0, len(reference), ROW_BATCH_SIZE):
        end_1 = begin_1 + ROW_BATCH_SIZE
        for begin_2 in range(0, len(sample), COL_BATCH_SIZE):
            end_2 = begin_2 + COL_BATCH_SIZE
            dist = pairwise_distances(reference[begin_1:end_1], sample[begin_2:end_2])[..., None]
            status_1[begin_1:end_1] |= np.any(dist <= radii_2[begin_2:end_2], axis=1)
            status_2[begin_2:end_2] |= np.any(dist <= radii_1[begin_1:end_1][:, None], axis=0)
    precision = np.mean(status_2.astype(np.float64), axis=0)
    recall = np.mean(status_1.astype(np.float64), axis=0)
    return float(precision[0]), float(recall[0])
