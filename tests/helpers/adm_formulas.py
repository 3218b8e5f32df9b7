"""ADM's evaluator.py formulas written out (openai/guided-diffusion, evaluations/evaluator.py at
commit 1b61a43), independent of fitscale.eval: the Frechet distance, the Inception Score over splits,
DistanceBlock's pairwise distances and ManifoldEstimator's precision/recall, for the tests that hold
fitscale's evaluator to them."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def adm_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6, check_imaginary=True):
    """FIDStatistics.frechet_distance. `check_imaginary=False` skips ADM's check that the square
    root's imaginary diagonal is ~0 (features of a random-weight network on a few images fail it)."""
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # SciPy >= 1.16 deprecates ADM's disp=False
        warnings.simplefilter("ignore", linalg.LinAlgWarning)  # ill-conditioned products of small sets
        covmean, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if check_imaginary:
            assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def adm_inception_score(preds, split_size=5000):
    """Evaluator.compute_inception_score: exp of the mean KL(p(y|x) || p(y)) per split, averaged."""
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def adm_distances(u, v):
    """DistanceBlock: float16 squares (tf.square), float32 accumulation, float32 when not finite."""
    u16, v16 = u.astype(np.float16).astype(np.float32), v.astype(np.float16).astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        nu = np.square(u.astype(np.float16)).astype(np.float32).sum(1).astype(np.float16)[:, None]
        nv = np.square(v.astype(np.float16)).astype(np.float32).sum(1).astype(np.float16)[None, :]
        d = np.maximum(nu - np.float16(2) * (u16 @ v16.T).astype(np.float16) + nv, np.float16(0))
    if np.isfinite(d).all():
        return d.astype(np.float32)
    u, v = u.astype(np.float32), v.astype(np.float32)
    return np.maximum((u**2).sum(1)[:, None] - 2 * (u @ v.T) + (v**2).sum(1)[None, :], 0).astype(np.float32)


def adm_precision_recall(ref, sample, k=3):
    """ManifoldEstimator as Evaluator builds it (k = 3, no percentile clamp), in one block: the test
    sets are far below ADM's 10000-row batches."""

    def radii(x):
        return np.partition(adm_distances(x, x), k, axis=1)[:, k]

    r_ref, r_sample = radii(ref), radii(sample)
    d = adm_distances(ref, sample)
    precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
    recall = np.mean(np.any(d <= r_sample[None, :], axis=1))
    return precision, recall
