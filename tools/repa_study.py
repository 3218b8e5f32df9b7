"""The REPA miniature's comparison (docs/repa.md): recognition rate and validation loss against steps.

    python tools/repa_study.py --out docs/repa runs/repa_study/plain_s0 ... runs/repa_study/repa_s0 ...

Every run folder's checkpoints (`checkpoint.interval=200`, `keep_last=0`) are sampled as the demo's
closing grid is (fitscale.sample.demo: 10 classes x 4 grids, guided at scale 6, EMA weights; 4 per
class and grid here) and scored by the classifier of real digits; the validation loss (of the
weights) comes from each run's metrics.jsonl (`train.val_every`). Runs are grouped by their name
without the `_sN` seed suffix. Writes `<out>/table.md`, `<out>/curves.png` and `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
from pathlib import Path


def recognition(step_dir: Path) -> float:
    """The fraction of 160 sampled digits (10 classes x 4 grids x 4) the real-digits classifier recognises."""
    from fitscale.sample.demo import demo_grids, sample_demo_grid

    with tempfile.TemporaryDirectory() as out:
        summary = sample_demo_grid(
            step_dir, out=out, grids=demo_grids(4, 8), per_class=4, cfg_scale=6.0, verbose=False
        )
    return summary["recognised"]


def val_losses(run_dir: Path) -> dict[int, float]:
    """Step -> val_loss of the run's validation events."""
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "validation":
            losses[int(record["step"])] = float(record["val_loss"])
    return losses


def step_seconds(run_dir: Path) -> tuple[float, float | None]:
    """Median seconds per step (from the logged images/s) and median encoder seconds per step
    (rank 0; None for a plain run)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["images"] / r["perf/images_per_s"] for r in records if r.get("perf/images_per_s")]
    encoder = [r["encoder_s"] for r in records if r.get("encoder_s") is not None]
    return statistics.median(steps), (statistics.median(encoder) if encoder else None)


def collect(run_dir: Path, cache: dict) -> dict:
    """Recognition per checkpoint step (cached by path in results.json), validation losses, encoder time."""
    scores = {}
    for step_dir in sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:])):
        key = str(step_dir)
        if key not in cache:
            cache[key] = recognition(step_dir)
        scores[int(step_dir.name[5:])] = cache[key]
    step, encoder = step_seconds(run_dir)
    return {"recognition": scores, "val_loss": val_losses(run_dir), "step_s": step, "encoder_s": encoder}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    cache = previous.get("cache", {})
    runs = {str(run): collect(run, cache) for run in args.runs}
    results_path.write_text(json.dumps({"runs": runs, "cache": cache}, indent=1))
    groups: dict[str, list[dict]] = {}
    for name, result in runs.items():
        groups.setdefault(re.sub(r"_s\d+$", "", Path(name).name), []).append(result)
    write_table(groups, args.out / "table.md")
    plot(groups, args.out / "curves.png")


def medians(results: list[dict], key: str) -> dict[int, float]:
    steps = sorted(set.intersection(*(set(r[key]) for r in results)))
    return {step: statistics.median(r[key][step] for r in results) for step in steps}


def write_table(groups: dict[str, list[dict]], path: Path) -> None:
    """Median over seeds (and each seed's value) of recognition and validation loss at every step,
    then the cost per step."""
    lines = [
        "| run | step | recognised (median) | recognised per seed | val loss (median) |",
        "|---|---|---|---|---|",
    ]
    costs = ["| run | seconds per step (median) | of which encoder (median) |", "|---|---|---|"]
    for name, results in groups.items():
        recog, val = medians(results, "recognition"), medians(results, "val_loss")
        for step in recog:
            seeds = ", ".join(f"{r['recognition'][step]:.1%}" for r in results)
            loss = f"{val[step]:.4f}" if step in val else "-"
            lines.append(f"| {name} | {step} | {recog[step]:.1%} | {seeds} | {loss} |")
        encoder = [r["encoder_s"] for r in results if r["encoder_s"] is not None]
        enc = f"{statistics.median(encoder):.4f}" if encoder else "-"
        costs.append(f"| {name} | {statistics.median(r['step_s'] for r in results):.4f} | {enc} |")
    path.write_text("\n".join(lines) + "\n\n" + "\n".join(costs) + "\n")


def plot(groups: dict[str, list[dict]], path: Path) -> None:
    """Recognition and validation loss against steps: each seed thin, the median thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for color, (name, results) in zip(("tab:blue", "tab:orange", "tab:green"), groups.items()):
        for key, axis in (("recognition", axes[0]), ("val_loss", axes[1])):
            for result in results:
                steps = sorted(result[key])
                axis.plot(steps, [result[key][s] for s in steps], color=color, alpha=0.3, linewidth=1)
            median = medians(results, key)
            axis.plot(
                list(median),
                list(median.values()),
                color=color,
                linewidth=2.5,
                label=f"{name} (median of {len(results)})",
            )
    axes[0].set(xlabel="step", ylabel="recognised by the real-digits classifier", title="recognition rate")
    axes[1].set(xlabel="step", ylabel="validation loss (weights)", title="validation loss")
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
