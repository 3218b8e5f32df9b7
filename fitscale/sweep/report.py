"""From collected results to fits and pictures: `fitscale sweep fit`.

Reads `results.json`, fits L(C) per model size and for the compute frontier, finds the isoFLOP
optimum at each budget with at least 3 sizes and fits N*(C) through them, then writes
`fits.json` and PNG plots (matplotlib, `pip install 'fitscale[sweep]'`) next to the results.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fitscale.sweep.fit import (
    IsoFlopOptimum,
    fit_optimal_size,
    fit_power_law,
    frontier,
    isoflop_optimum,
)

METRICS = ("val_loss_ema", "val_loss", "train_loss", "fid")


def _usable(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    return [r for r in rows if isinstance(r.get(metric), (int, float)) and r.get("step")]


def _compute(row: dict[str, Any]) -> float:
    return float(row.get("training_flops_done") or row["training_flops"])


def analyse(rows: list[dict[str, Any]], metric: str = "val_loss_ema", bootstrap: int = 200) -> dict[str, Any]:
    """Fits of `metric` against training compute (ours); parts without enough runs are listed as skipped."""
    usable = _usable(rows, metric)
    if not usable:
        raise ValueError(
            f"no run has a `{metric}` value; run `fitscale sweep collect` (metrics: {', '.join(METRICS)})"
        )
    result: dict[str, Any] = {"metric": metric, "per_model": {}, "skipped": []}
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in usable:
        by_model[row["model"]].append(row)
    for model, model_rows in by_model.items():
        if len({_compute(r) for r in model_rows}) < 3:
            result["skipped"].append(f"L(C) of {model}: needs runs at >= 3 compute values")
            continue
        fit = fit_power_law([_compute(r) for r in model_rows], [r[metric] for r in model_rows], bootstrap)
        result["per_model"][model] = {**fit.to_dict(), "parameters": model_rows[0]["parameters"]}
    front = frontier([(_compute(r), r[metric]) for r in usable])
    result["frontier_points"] = front
    if len(front) >= 3:
        result["frontier"] = fit_power_law(*zip(*front), bootstrap=bootstrap).to_dict()
    else:
        result["skipped"].append("frontier L(C): needs >= 3 frontier points")
    optima: list[IsoFlopOptimum] = []
    by_budget: dict[float, list[dict[str, Any]]] = defaultdict(list)
    for row in usable:
        if row.get("budget") and row.get("status") == "done":
            by_budget[float(row["budget"])].append(row)
    for budget, budget_rows in sorted(by_budget.items()):
        if len({r["parameters"] for r in budget_rows}) < 3:
            result["skipped"].append(f"isoFLOP at {budget:.2e}: needs >= 3 model sizes")
            continue
        optimum = isoflop_optimum(
            budget, [r["parameters"] for r in budget_rows], [r[metric] for r in budget_rows], bootstrap
        )
        if optimum is None:
            result["skipped"].append(f"isoFLOP at {budget:.2e}: the losses have no minimum over size")
        else:
            optima.append(optimum)
    result["isoflop"] = [vars(o) for o in optima]
    if len(optima) >= 2:
        result["optimal_size"] = vars(fit_optimal_size(optima))
    else:
        result["skipped"].append("N*(C): needs isoFLOP optima at >= 2 budgets")
    return result


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, metric: str = "val_loss_ema") -> list[Path]:
    """`fits.json` and the PNG plots in `out_dir`; returns the files written."""
    out_dir = Path(out_dir)
    analysis = analyse(rows, metric)
    written = [out_dir / "fits.json"]
    written[0].write_text(json.dumps(analysis, indent=1))
    written += plot_loss_vs_compute(rows, analysis, out_dir / "loss_vs_compute.png")
    if analysis["isoflop"]:
        written += plot_isoflop(rows, analysis, out_dir / "isoflop.png")
    return written


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only); ImportError says which extra installs it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'fitscale[sweep]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_vs_compute(rows: list[dict[str, Any]], analysis: dict[str, Any], path: Path) -> list[Path]:
    """Every run's loss against compute (log-log), each size's fit, and the frontier fit."""
    plt = pyplot()
    metric = analysis["metric"]
    usable = _usable(rows, metric)
    figure, axes = plt.subplots(figsize=(7, 5))
    models = sorted(
        {r["model"] for r in usable}, key=lambda m: min(r["parameters"] for r in usable if r["model"] == m)
    )
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(models), 1)))
    span = np.geomspace(min(_compute(r) for r in usable), max(_compute(r) for r in usable), 100)
    for model, colour in zip(models, colours):
        mine = [r for r in usable if r["model"] == model]
        axes.scatter(
            [_compute(r) for r in mine], [r[metric] for r in mine], color=colour, label=model, zorder=3
        )
        fit = analysis["per_model"].get(model)
        if fit:
            axes.plot(span, fit["a"] * span ** (-fit["b"]) + fit["c"], color=colour, lw=1)
    if "frontier" in analysis:
        fit = analysis["frontier"]
        label = f"frontier: {fit['a']:.3g} C^-{fit['b']:.3f} + {fit['c']:.3f}"
        axes.plot(span, fit["a"] * span ** (-fit["b"]) + fit["c"], "k--", lw=1.5, label=label)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("training compute (FLOPs, 2 per multiply-add)")
    axes.set_ylabel(metric)
    axes.legend(fontsize=8)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]


def plot_isoflop(rows: list[dict[str, Any]], analysis: dict[str, Any], path: Path) -> list[Path]:
    """Left: loss against size per budget with its parabola; right: N*(C) with its fit."""
    plt = pyplot()
    metric = analysis["metric"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    optima = analysis["isoflop"]
    colours = plt.cm.plasma(np.linspace(0, 0.85, len(optima)))
    for optimum, colour in zip(optima, colours):
        mine = [r for r in _usable(rows, metric) if r.get("budget") == optimum["budget"]]
        n = np.array([r["parameters"] for r in mine], dtype=np.float64)
        loss = np.array([r[metric] for r in mine])
        left.scatter(n, loss, color=colour, label=f"C = {optimum['budget']:.1e}")
        coefficients = np.polyfit(np.log(n), loss, 2)
        grid = np.geomspace(n.min(), n.max(), 50)
        left.plot(grid, np.polyval(coefficients, np.log(grid)), color=colour, lw=1)
        left.axvline(optimum["n_opt"], color=colour, ls=":", lw=1)
    left.set_xscale("log")
    left.set_xlabel("parameters")
    left.set_ylabel(metric)
    left.legend(fontsize=8)
    budgets = np.array([o["budget"] for o in optima])
    n_opt = np.array([o["n_opt"] for o in optima])
    errors = np.array([[o["n_opt"] - o["n_interval"][0], o["n_interval"][1] - o["n_opt"]] for o in optima]).T
    right.errorbar(budgets, n_opt, yerr=np.clip(errors, 0, None), fmt="o", color="k")
    if "optimal_size" in analysis:
        fit = analysis["optimal_size"]
        span = np.geomspace(budgets.min(), budgets.max(), 50)
        lo, hi = fit["alpha_interval"]
        right.plot(
            span,
            fit["k"] * span ** fit["alpha"],
            "k--",
            label=f"N* ~ C^{fit['alpha']:.2f} [{lo:.2f}, {hi:.2f}]",
        )
        right.legend(fontsize=8)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("training compute (FLOPs)")
    right.set_ylabel("compute-optimal parameters")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]
