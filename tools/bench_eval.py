"""Benchmark of `fitscale eval`: Inception feature throughput (images/s) and the peak memory of a
whole evaluation at two image counts, from which the memory per image follows.

    python tools/bench_eval.py [--counts 32 96] [--size 256] [--device cpu] [--weights FILE --sha256 HEX]

Without --weights a randomly initialised network (same architecture, same cost) is used. Each
count runs in a fresh process (its peak RSS is `ru_maxrss`): `fitscale.eval.evaluate` of a batch
of COUNT random pictures against a reference batch of COUNT pictures with stored statistics, with
every metric. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_batches(count: int, size: int, folder: Path) -> None:
    """A sample and a reference batch of `count` random pictures (written by the parent process, so
    that the child's peak memory is the evaluation's alone)."""
    from fitscale.eval.inception import FEATURE_WIDTHS

    rng = np.random.default_rng(count)
    np.savez(folder / "sample.npz", arr_0=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8))
    stats = {
        "mu": np.zeros(FEATURE_WIDTHS["pool"]),
        "sigma": np.eye(FEATURE_WIDTHS["pool"]),
        "mu_s": np.zeros(FEATURE_WIDTHS["spatial"]),
        "sigma_s": np.eye(FEATURE_WIDTHS["spatial"]),
    }
    np.savez(folder / "ref.npz", arr_0=rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), **stats)


def one_run(count: int, device: str, weights: str, sha256: str, batch_size: int, folder: Path) -> dict:
    """Evaluate the batches of `folder` in this process; its peak RSS and the times."""
    from fitscale.eval.evaluate import EvalSettings, evaluate

    settings = EvalSettings(weights, sha256, device, batch_size=batch_size)
    start = time.perf_counter()
    evaluate(folder / "sample.npz", folder / "ref.npz", settings, folder / "work", metrics=False)
    features_s = time.perf_counter() - start
    start = time.perf_counter()
    evaluate(folder / "sample.npz", folder / "ref.npz", settings, folder / "work")  # features kept: metrics
    metrics_s = time.perf_counter() - start
    return {
        "count": count,
        "features_s": features_s,
        "images_per_s": 2 * count / features_s,  # sample and reference
        "metrics_s": metrics_s,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    """Run every count in a fresh process and print the JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs=2, default=[32, 96])
    parser.add_argument("--size", type=int, default=256, help="picture side in pixels")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="Inception batch (ADM: 64); below both counts, so the "
        "network's activations are the same at both and the difference is the per-image memory",
    )
    parser.add_argument("--weights", default=None)
    parser.add_argument("--sha256", default=None)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # a child process
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(
            json.dumps(
                one_run(args.one, args.device, args.weights, args.sha256, args.batch_size, Path(args.folder))
            )
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.weights is None:
            from fitscale.eval.inception import save_random_weights

            args.weights = str(Path(tmp) / "random.pth")
            args.sha256 = save_random_weights(args.weights)
        runs = []
        for count in args.counts:
            folder = Path(tmp) / str(count)
            folder.mkdir()
            write_batches(count, args.size, folder)
            child = [sys.executable, __file__, "--one", str(count), "--folder", str(folder), "--device", args.device,
                     "--weights", args.weights, "--batch-size", str(args.batch_size)]  # fmt: skip
            child += ["--sha256", args.sha256] if args.sha256 else []
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    (a, b) = runs
    per_image = (b["peak_rss_mib"] - a["peak_rss_mib"]) * 1024 / (2 * (b["count"] - a["count"]))
    summary = {
        "runs": runs,
        "peak_rss_kib_per_image": per_image,
        "size": args.size,
        "batch_size": args.batch_size,
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
