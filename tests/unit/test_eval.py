"""`fitscale eval`: ADM's metrics against their formulas written out here, and every bad input as one
line before anything is computed or written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.adm_formulas import adm_distances, adm_frechet, adm_inception_score, adm_precision_recall
from PIL import Image

from fitscale.cli import main
from fitscale.eval import adm
from fitscale.eval.reference import center_crop_arr, resize_picture


def test_metrics_equal_adm_formulas_on_random_features():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 40)) * rng.uniform(0.5, 2, 40)
    b = rng.standard_normal((250, 40)) + 0.3
    sa = adm.compute_statistics(a)
    sb = adm.statistics_from_sums(len(b), b.sum(0), b.T @ b)  # the sums fitscale reduces over ranks
    expected = adm_frechet(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert adm.frechet_distance(sb, sa) == pytest.approx(expected, rel=1e-9)
    logits = rng.standard_normal((11000, 20)).astype(np.float32) * 3  # 3 splits, the last partial
    softmax = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    assert adm.inception_score(softmax) == pytest.approx(adm_inception_score(softmax), rel=1e-6)
    assert adm.inception_score(softmax) != pytest.approx(adm_inception_score(softmax, 11000), rel=1e-3)
    mixing = rng.standard_normal((8, 2048)) * 0.1  # features on an 8-dimensional manifold, as Inception's are
    pool_ref = (rng.standard_normal((300, 8)) @ mixing).astype(np.float32)
    pool_sample = (rng.normal(0.3, 1.2, (250, 8)) @ mixing).astype(np.float32)
    got = adm.precision_recall(pool_ref, pool_sample)
    assert got == pytest.approx(adm_precision_recall(pool_ref, pool_sample), rel=1e-6)
    assert 0 < got[0] < 1 and 0 < got[1] < 1  # not a degenerate case


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning", "ignore:invalid value:RuntimeWarning")
def test_frechet_distance_offsets_the_diagonal_when_the_square_root_is_not_finite():
    """ADM's branch for a product without a square root: scipy's sqrtm of sigma1 @ sigma2 =
    [[0, 1], [0, 0]] (a Jordan block at 0, exactly triangular, so no machine's Schur form differs) is
    not finite, and the distance then uses sqrtm((sigma1 + eps I)(sigma2 + eps I)), eps = 1e-6.
    Checked against that trace written out for 2 x 2: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) when
    M's eigenvalues are positive (they are: sigma1[0, 0] > 1/eps)."""
    sigma1 = np.array([[4e6, 1.0], [1.0, 0.0]])
    sigma2 = np.array([[0.0, 0.0], [0.0, 1.0]])
    mu1, mu2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
    np.testing.assert_array_equal(sigma1 @ sigma2, [[0.0, 1.0], [0.0, 0.0]])
    offset = np.eye(2) * 1e-6
    product = (sigma1 + offset) @ (sigma2 + offset)
    trace_sqrt = np.sqrt(np.trace(product) + 2 * np.sqrt(np.linalg.det(product)))
    diff = mu1 - mu2
    expected = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    with pytest.warns(UserWarning, match="singular product; adding 1e-06 to diagonal"):
        got = adm.frechet_distance(adm.FIDStatistics(mu1, sigma1), adm.FIDStatistics(mu2, sigma2))
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-9)
    assert got == pytest.approx(adm_frechet(mu1, sigma1, mu2, sigma2), rel=1e-12)


def test_distances_fall_back_to_float32_when_float16_overflows():
    rng = np.random.default_rng(1)
    u = rng.standard_normal((20, 64)).astype(np.float32) * 100  # |u|^2 ~ 640000 > float16's 65504
    v = rng.standard_normal((30, 64)).astype(np.float32) * 100
    got = adm.pairwise_distances(u, v)
    exact = ((u[:, None, :].astype(np.float64) - v[None]) ** 2).sum(-1)
    assert np.isfinite(got).all() and got.dtype == np.float32
    np.testing.assert_allclose(got, exact, rtol=1e-4)
    small = adm.pairwise_distances(u / 1000, v / 1000)  # float16: 3 decimal digits
    np.testing.assert_array_equal(small, adm_distances(u / 1000, v / 1000))
    assert np.abs(small - exact / 1e6).max() / (exact / 1e6).max() < 1e-2


def test_distances_square_each_feature_in_float16_as_adms_graph_does():
    """ADM's DistanceBlock runs tf.square on float16 features: every square is rounded to float16
    before the sum. On pool-like features (non-negative, a few units) the distances equal that
    written out bit for bit, and squaring in float32 instead gives other float16 norms."""
    rng = np.random.default_rng(2)
    u = rng.gamma(0.5, 0.8, (40, 2048)).astype(np.float32)
    v = rng.gamma(0.5, 0.8, (30, 2048)).astype(np.float32)
    got = adm.pairwise_distances(u, v)
    np.testing.assert_array_equal(got, adm_distances(u, v))
    u16 = u.astype(np.float16)
    squared_in_float32 = np.square(u16.astype(np.float32)).sum(1).astype(np.float16)
    squared_in_float16 = np.square(u16).astype(np.float32).sum(1).astype(np.float16)
    assert (squared_in_float32 != squared_in_float16).any()  # the two roundings differ on these rows


def test_center_crop_is_adms_and_nonsquare_recipes_keep_or_fill():
    rng = np.random.default_rng(2)
    picture = Image.fromarray(rng.integers(0, 256, (600, 900, 3), dtype=np.uint8))
    square = center_crop_arr(picture, 256)
    # ADM: 600x900 -> BOX to 300x450 (600 >= 512), BICUBIC to 256x384, centre crop columns 64..320
    box = picture.resize((450, 300), resample=Image.BOX).resize((384, 256), resample=Image.BICUBIC)
    np.testing.assert_array_equal(square, np.asarray(box)[:, 64:320])
    assert resize_picture(picture, 256, 256).tobytes() == square.tobytes()
    crop = resize_picture(picture, 160, 480, "crop")  # 900 < 2 x 480: no halving; 320 x 480 covers 160 x 480
    area = resize_picture(picture, 160, 480, "area")
    assert crop.shape == area.shape == (160, 480, 3)
    expected = np.asarray(picture.resize((480, 320), Image.BICUBIC))[80:240]
    np.testing.assert_array_equal(crop, expected)
    np.testing.assert_array_equal(area, np.asarray(picture.resize((480, 160), Image.BICUBIC)))


@pytest.fixture
def batches(tmp_path):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "sample.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    np.savez(tmp_path / "bare.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    stats = {"mu": np.zeros(1), "sigma": np.eye(1), "mu_s": np.zeros(1), "sigma_s": np.eye(1)}  # present
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), **stats)
    (tmp_path / "weights.pth").write_bytes(b"not the inception weights")
    return tmp_path


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(["eval", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    assert "\n" not in err  # one line, no traceback
    return code, err


def test_bad_inputs_are_one_line_before_anything_is_computed(batches, capsys, monkeypatch):
    d = batches
    monkeypatch.setenv("FITSCALE_INCEPTION_WEIGHTS", str(d / "weights.pth"))
    code, err = run_cli(capsys, d / "sample.npz", "--ref", d / "bare.npz")
    assert code == 2 and "bare.npz: no mu/sigma/mu_s/sigma_s" in err and "--ref-stats-from-arr0" in err
    np.savez(d / "float.npz", arr_0=np.zeros((6, 32, 32, 3), np.float32))
    code, err = run_cli(capsys, d / "float.npz", "--ref", d / "ref.npz")
    assert code == 2 and "float.npz: arr_0 is float32, not uint8" in err
    (d / "mixed").mkdir()
    for i, size in enumerate((32, 32, 48)):
        Image.new("RGB", (size, size)).save(d / "mixed" / f"{i}.png")
    code, err = run_cli(capsys, d / "mixed", "--ref", d / "ref.npz")
    assert code == 2 and "2.png: 48x48 pixels, but 0.png is 32x32" in err
    np.savez(d / "three.npz", arr_0=np.zeros((3, 32, 32, 3), np.uint8))
    code, err = run_cli(capsys, d / "three.npz", "--ref", d / "ref.npz")
    assert code == 2 and "3 pictures; precision/recall need more than k=3" in err
    code, err = run_cli(capsys, d / "sample.npz", "--ref", d / "ref.npz")
    assert code == 2 and "weights.pth: sha256" in err and "is not the expected 6726825d" in err
    code, err = run_cli(
        capsys, d / "sample.npz", "--ref", d / "ref.npz", "--inception-weights", d / "none.pth"
    )
    assert code == 2 and "none.pth not found; download https://github.com/toshas/torch-fidelity" in err
    (d / "features.npz").write_bytes(b"kept")
    code, err = run_cli(
        capsys, d / "sample.npz", "--ref", d / "ref.npz", "--save-features", d / "features.npz"
    )
    assert code == 2 and "features.npz exists" in err and "--overwrite" in err
    assert (d / "features.npz").read_bytes() == b"kept"


def test_paper_tables_name_their_reference_and_refuse_a_missing_one(tmp_path, capsys):
    from fitscale.eval.paper import reference_for, sample_args, write_tables

    code = main(["eval-paper", "ckpt", "--vae", "vae", "--refs", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no reference batch for 256x256" in err and "VIRTUAL_imagenet256_labeled.npz" in err
    assert not (tmp_path / "o").exists()  # nothing sampled or written
    (tmp_path / "VIRTUAL_imagenet512.npz").write_bytes(b"")
    (tmp_path / "ref_320x640.npz").write_bytes(b"")
    assert reference_for(tmp_path, "512", "320x640").name == "ref_320x640.npz"  # built for that size
    assert (
        reference_for(tmp_path, "512", "256x768").name == "VIRTUAL_imagenet512.npz"
    )  # the table's ADM batch
    assert sample_args("256", "256x256") == "--cfg 1.5 --sampler dopri5"
    assert sample_args("256", "160x480").endswith("--interpolation dynntk --decouple")
    row = {"size": "224x448", "fid": 5.544, "sfid": 1, "inception_score": 2, "precision": 0.5, "recall": 0.25,
           "images": 50000, "reference": "/r/VIRTUAL_imagenet256_labeled.npz", "comparable": True,
           "sample_args": "--cfg 1.5"}  # fmt: skip
    write_tables(tmp_path, [row])
    assert (
        "| 224x448 | 5.54 | 1.00 | 2.00 | 0.50 | 0.25 | 50000 | VIRTUAL_imagenet256_labeled.npz |"
        in (tmp_path / "table.md").read_text()
    )
    assert json.loads((tmp_path / "table.json").read_text()) == [row]


def test_the_result_prints_adms_five_numbers_and_says_when_not_comparable(capsys):
    from fitscale.eval.cli import print_result

    result = {"fid": 2.2612345, "sfid": 4.53, "inception_score": 260.95, "precision": 0.81, "recall": 0.59,
              "images": 50000, "size": "256x256", "reference": "VIRTUAL_imagenet256_labeled.npz",
              "reference_statistics": "stored (whole set)", "comparable": True}  # fmt: skip
    print_result(result, as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:5] == [
        "FID: 2.26123",
        "sFID: 4.53",
        "Inception Score: 260.95",
        "Precision: 0.81",
        "Recall: 0.59",
    ]
    assert len(lines) == 6
    print_result({**result, "comparable": False}, as_json=False)
    assert "NOT comparable" in capsys.readouterr().out
    print_result(result, as_json=True)
    assert json.loads(capsys.readouterr().out) == result


def test_a_work_folder_of_another_evaluation_is_refused(tmp_path):
    from fitscale.eval.features import check_manifest

    check_manifest(tmp_path / "w", {"source": "a.npz", "count": 10}, rank=0, world_size=1)
    check_manifest(
        tmp_path / "w", {"source": "a.npz", "count": 10}, rank=0, world_size=1
    )  # the same: resumes
    with pytest.raises(ValueError, match=r"w holds features of another evaluation \(count: 10, now 12\)"):
        check_manifest(tmp_path / "w", {"source": "a.npz", "count": 12}, rank=0, world_size=1)
