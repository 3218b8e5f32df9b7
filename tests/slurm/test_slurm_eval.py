"""`fitscale eval` as a SLURM job step: `srun -n 2 python -m fitscale.cli eval ...` on the one-host
cluster gives the features and numbers one local process gives (docs/evaluation.md, "At scale")."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.eval_batches import fitscale, smooth_pictures

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_two_srun_tasks_give_one_local_processs_features_and_numbers(slurm_cluster, tmp_path):
    """Both ranks read their place from SLURM's variables (SLURM_PROCID, SLURM_STEP_NUM_TASKS, the
    job's node list and port) and share the feature parts through --work; rank 0 reduces them. The
    same thread count in every process (2: rank 0's two 2048 x 2048 square roots dominate), so every
    feature is computed by the same kernels: the saved
    features are equal bit for bit and so is every number (a rank that computed or reduced another
    rank's parts would give other features; a lone process per task would print two results, which
    json.loads refuses)."""
    from fitscale.eval.inception import save_random_weights

    sha = save_random_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "sample.npz", arr_0=smooth_pictures(rng, 5, 32))
    np.savez(tmp_path / "ref.npz", arr_0=smooth_pictures(rng, 4, 32))
    env = {"FITSCALE_INCEPTION_WEIGHTS": str(tmp_path / "inception.pth"), "OMP_NUM_THREADS": "2"}

    def evaluate(name: str, prefix: tuple = ()) -> tuple[dict, dict]:
        out = fitscale("eval", tmp_path / "sample.npz", "--ref", tmp_path / "ref.npz", "--ref-stats-from-arr0",
                       "--save-features", tmp_path / f"{name}.npz", "--work", tmp_path / f"work-{name}",
                       "--part-size", "3", "--batch-size", "3", "--inception-sha256", sha, "--device", "cpu",
                       "--json", env=env, prefix=prefix, timeout=600)  # fmt: skip
        with np.load(tmp_path / f"{name}.npz") as f:
            return json.loads(out), {k: f[k] for k in f}

    one, one_features = evaluate("local")
    srun = ("srun", "--ntasks", "2", "--time", "10", "--job-name", "fitscale-eval-test")
    two, two_features = evaluate("srun", srun)
    parts = sorted(p.name for p in (tmp_path / "work-srun" / "sample").glob("part-*.npz"))
    assert parts == ["part-000000.npz", "part-000001.npz"]  # one per rank
    for key in ("pool", "spatial", "softmax"):
        np.testing.assert_array_equal(two_features[key], one_features[key])
    for key in ("fid", "sfid", "inception_score", "precision", "recall"):
        assert two[key] == pytest.approx(one[key], rel=1e-9), key
    assert one["images"] == two["images"] == 5
