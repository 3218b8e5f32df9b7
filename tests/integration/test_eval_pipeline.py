"""`fitscale eval` / `eval-ref` end to end on CPU with an Inception network of random weights saved to a
file: every metric recomputed here from the saved features with ADM's formulas written out; the same
features on 1, 2 and 3 ranks (real gloo processes); an interrupted evaluation resumes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers.adm_formulas import adm_distances, adm_frechet
from helpers.eval_batches import fitscale, smooth_pictures
from PIL import Image

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fitscale.eval.inception import save_random_weights

    d = tmp_path_factory.mktemp("eval")
    sha = save_random_weights(d / "inception.pth")
    rng = np.random.default_rng(0)
    np.savez(d / "sample.npz", arr_0=smooth_pictures(rng, 7, 32))
    (d / "train" / "a").mkdir(parents=True)
    for i, (h, w) in enumerate([(40, 60), (64, 48), (32, 32), (50, 50), (70, 40), (33, 90)]):
        picture = smooth_pictures(rng, 1, max(h, w))[0][:h, :w]
        Image.fromarray(picture).save(d / "train" / ("a" if i % 2 else "") / f"{i}.png")
    env = {"FITSCALE_INCEPTION_WEIGHTS": str(d / "inception.pth")}
    return d, sha, env


# Every run cuts both batches the same way: parts of 2 images (4 sample parts, 3 reference parts),
# Inception batches of 2; the ranks' runs must give the one-rank run's features bit for bit.
PARTS = ("--part-size", "2", "--batch-size", "2")


@pytest.fixture(scope="module")
def one_rank(setup):
    """The one-rank evaluation both tests read (computed once: its two 2048 x 2048 square roots and
    the network's start-up dominate): `eval-ref` of the training folder, then `fitscale eval` of the
    sample with both batches' features saved and its feature parts kept in `work1`."""
    d, sha, env = setup
    summary = fitscale("eval-ref", d / "train", "--size", "32x32", "--out", d / "ref.npz",
                       "--inception-sha256", sha, "--json", env=env)  # fmt: skip
    out = fitscale("eval", d / "sample.npz", "--ref", d / "ref.npz", "--save-features", d / "results" / "f.npz",
                   "--save-ref-features", d / "results" / "rf.npz", "--out", d / "results" / "eval.json",
                   "--inception-sha256", sha, "--json", "--work", d / "work1",
                   "--device", "cpu", *PARTS, env=env)  # fmt: skip
    # Every output went to a folder that did not exist: made before the work, not lost at its end.
    assert json.loads((d / "results" / "eval.json").read_text()) == json.loads(out)
    return json.loads(summary), json.loads(out)


def test_every_metric_equals_adms_formulas_on_the_saved_features(setup, one_rank):
    d, sha, env = setup
    summary, got = one_rank
    assert summary["pictures"] == 6
    with np.load(d / "ref.npz") as ref:
        assert ref["arr_0"].shape == (6, 32, 32, 3) and ref["arr_0"].dtype == np.uint8
        mu, sigma, mu_s, sigma_s = (ref[k] for k in ("mu", "sigma", "mu_s", "sigma_s"))
    with np.load(d / "results" / "f.npz") as f, np.load(d / "results" / "rf.npz") as rf:
        pool, spatial, softmax, ref_pool = f["pool"], f["spatial"], f["softmax"], rf["pool"]
    assert pool.shape == (7, 2048) and spatial.shape == (7, 2023) and softmax.shape == (7, 1008)
    # the stored statistics are the whole set's, computed as ADM's compute_statistics would
    assert ref_pool.shape == (6, 2048)  # arr_0 holds the whole (small) set here
    np.testing.assert_allclose(mu, ref_pool.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma, np.cov(ref_pool, rowvar=False), rtol=1e-6, atol=1e-10)
    expected = {
        "fid": adm_frechet(pool.mean(0), np.cov(pool, rowvar=False), mu, sigma, check_imaginary=False),
        "sfid": adm_frechet(
            spatial.mean(0), np.cov(spatial, rowvar=False), mu_s, sigma_s, check_imaginary=False
        ),
    }
    kl = softmax * (np.log(softmax) - np.log(softmax.mean(0, keepdims=True)))
    expected["inception_score"] = float(np.exp(np.mean(np.sum(kl, 1))))  # one split: N < 5000
    r_ref = np.partition(adm_distances(ref_pool, ref_pool), 3, axis=1)[:, 3]
    r_sample = np.partition(adm_distances(pool, pool), 3, axis=1)[:, 3]
    cross = adm_distances(ref_pool, pool)
    expected["precision"] = np.mean(np.any(cross <= r_ref[:, None], axis=0))
    expected["recall"] = np.mean(np.any(cross <= r_sample[None, :], axis=1))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert got["fid"] > 0.1 and got["comparable"] is False  # random weights: labelled


def test_one_two_and_three_ranks_give_the_same_features_and_resume(setup, one_rank):
    """2 ranks from scratch; 3 ranks resume the 1-rank folder with 3 of its 4 sample parts removed
    (as if stopped): only those are computed, on 3 ranks, and the features are the 1-rank run's bit
    for bit each time (so is every number computed from them)."""
    d, sha, env = setup

    def features(nproc, work, out):
        fitscale("eval", d / "sample.npz", "--ref", d / "ref.npz", "--features-only", "--save-features", out,
                 "--work", work, "--nproc", nproc, "--inception-sha256", sha, "--device", "cpu", *PARTS,
                 env=env)  # fmt: skip
        with np.load(out) as f:
            return {k: f[k] for k in f}

    with np.load(d / "results" / "f.npz") as f:
        one = {k: f[k] for k in f}
    two = features(2, d / "work2", d / "f2.npz")
    shutil.copytree(d / "work1", d / "work3")
    parts = sorted((d / "work3" / "sample").glob("part-*.npz"))
    assert len(parts) == 4
    for part in parts[1:]:  # parts 1, 2, 3: ranks 1, 2, 0 of 3 compute them
        part.unlink()
    kept = parts[0].stat().st_mtime_ns
    three = features(3, d / "work3", d / "f3.npz")
    assert parts[0].stat().st_mtime_ns == kept  # a finished part is not computed again
    assert sorted(p.name for p in (d / "work3" / "sample").glob("part-*.npz")) == [p.name for p in parts]
    for other in (two, three):
        for key in ("pool", "spatial", "softmax"):
            np.testing.assert_array_equal(other[key], one[key])
