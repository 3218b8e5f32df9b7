"""PNG plots of `fitscale sweep fit` (matplotlib, `pip install 'fitscale[sweep]'`).

- `loss_vs_compute.png`: every run's loss against training compute, each size's L(C) fit and the
  frontier fit with their bootstrap bands, the learning rates not chosen faint, held-out runs as
  stars with the law's prediction interval.
- `isoflop.png`: loss against size per budget with its parabola and the optimum's interval;
  N*(C) with its band, optima outside the sizes tried drawn hollow (left out of the fit unless asked).
The metric and why it was chosen are in each plot's title.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from fitscale.plotting import pyplot
from fitscale.sweep.rows import has_metric, training_compute


def compact(value: float) -> str:
    """Short tick labels: 6.0e10 -> '6e10', 52_000 -> '52K', 1.2e6 -> '1.2M', 0.85 -> '0.85'."""
    if value >= 1e10:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        text = f"{value / scale:.3g}"
        if value >= scale and "e" not in text:
            return text + suffix
    return f"{value:.3g}"


def readable_log_axis(axis, values: list[float], most: int = 6) -> None:
    """Log-scale ticks at (at most `most` of) `values` with compact labels and no minor labels; a
    value closer to the previous tick than 1/(2 most) of the axis' log range is dropped, so no two
    labels overlap."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    values = sorted(float(v) for v in values if v > 0)
    gap = max(1.15, (values[-1] / values[0]) ** (1 / (2 * most))) if values else 1.15
    ticks: list[float] = []
    for value in values:
        if not ticks or value > ticks[-1] * gap:
            ticks.append(value)
    if len(ticks) > most:
        ticks = [ticks[int(i)] for i in np.linspace(0, len(ticks) - 1, most).round()]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: compact(v)))
    axis.set_minor_formatter(NullFormatter())


def _loss_ticks(values: list[float]) -> list[float]:
    """Five round loss values (2 significant digits) spread over the range of `values`."""
    return [float(f"{v:.2g}") for v in np.geomspace(min(values), max(values), 5)]


def _title(axes, analysis: dict[str, Any], what: str) -> None:
    text = f"{what}: {analysis['metric']} ({analysis['metric_reason']})"
    axes.set_title("\n".join(textwrap.wrap(text, 95)), fontsize=7.5, loc="left")


def plot_loss_vs_compute(rows: list[dict[str, Any]], analysis: dict[str, Any], path: Path) -> list[Path]:
    """Loss against training FLOPs per model size with the fitted frontier L(C); writes the PNG, returns
    its path(s).
    """
    plt = pyplot()
    metric = analysis["metric"]
    fitted = set(analysis["fitted_runs"])
    scored = [r for r in rows if has_metric(r, metric)]
    figure, axes = plt.subplots(figsize=(8, 5.5))
    models = sorted(
        {r["model"] for r in scored if not r.get("held_out")},
        key=lambda m: min(r["parameters"] for r in scored if r["model"] == m),
    )
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(len(models), 1)))
    for model, colour in zip(models, colours):
        mine = [r for r in scored if r["model"] == model and not r.get("held_out")]
        best = [r for r in mine if r["run"] in fitted]
        others = [r for r in mine if r["run"] not in fitted]
        axes.scatter(
            [training_compute(r) for r in best],
            [r[metric] for r in best],
            color=colour,
            label=model,
            zorder=3,
        )
        if others:
            axes.scatter(
                [training_compute(r) for r in others],
                [r[metric] for r in others],
                color=colour,
                alpha=0.3,
                s=12,
            )
        fit = analysis["per_model"].get(model)
        if fit:
            span = np.asarray(fit["band"]["compute"] if fit["band"] else _span(best))
            axes.plot(span, fit["a"] * span ** (-fit["b"]) + fit["c"], color=colour, lw=1)
            if fit["band"]:
                axes.fill_between(span, fit["band"]["lo"], fit["band"]["hi"], color=colour, alpha=0.15, lw=0)
    if len(fitted) < len([r for r in scored if not r.get("held_out")]):
        axes.scatter([], [], color="grey", alpha=0.3, s=12, label="learning rates not chosen")
    if "frontier" in analysis:
        fit = analysis["frontier"]
        span = np.asarray(fit["band"]["compute"] if fit["band"] else _span(scored))
        interval = (
            f" (b in [{fit['b_interval'][0]:.2f}, {fit['b_interval'][1]:.2f}])" if fit["b_interval"] else ""
        )
        label = f"frontier: {fit['a']:.3g} C^-{fit['b']:.3f} + {fit['c']:.3f}{interval}"
        axes.plot(span, fit["a"] * span ** (-fit["b"]) + fit["c"], "k--", lw=1.5, label=label)
        if fit["band"]:
            axes.fill_between(span, fit["band"]["lo"], fit["band"]["hi"], color="k", alpha=0.08, lw=0)
    for held in analysis.get("held_out", []):
        if "measured" not in held:
            continue
        axes.scatter(
            [held["compute"]],
            [held["measured"]],
            marker="*",
            s=110,
            color="crimson",
            zorder=3,
            label=f"held out {held['run']} (measured)",
        )
        if held.get("predicted") is not None:
            lo, hi = held["interval"] or (held["predicted"], held["predicted"])
            axes.errorbar(
                [held["compute"]],
                [held["predicted"]],
                yerr=[[held["predicted"] - lo], [hi - held["predicted"]]],
                fmt="_",
                markersize=14,
                color="darkred",
                capsize=6,
                zorder=4,
                label=f"L(N, D) prediction {held['predicted']:.3f} and interval ({held['error_percent']:+.1f}%)",
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    budgets = [r.get("budget") or training_compute(r) for r in scored]
    readable_log_axis(axes.xaxis, budgets)
    readable_log_axis(axes.yaxis, _loss_ticks([r[metric] for r in scored]))
    axes.set_xlabel("training compute (FLOPs, 2 per multiply-add)")
    axes.set_ylabel(metric)
    _title(axes, analysis, "loss against compute")
    axes.legend(fontsize=7)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]


def _span(rows: list[dict[str, Any]]) -> np.ndarray:
    return np.geomspace(min(training_compute(r) for r in rows), max(training_compute(r) for r in rows), 40)


def plot_isoflop(rows: list[dict[str, Any]], analysis: dict[str, Any], path: Path) -> list[Path]:
    """IsoFLOP curves (loss against parameters per budget) and the optima's N*(C) fit; writes the PNG,
    returns its path(s).
    """
    plt = pyplot()
    metric = analysis["metric"]
    fitted = set(analysis["fitted_runs"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    optima = analysis["isoflop"]
    colours = plt.cm.plasma(np.linspace(0, 0.85, len(optima)))
    sizes = set()
    for optimum, colour in zip(optima, colours):
        mine = [r for r in rows if r["run"] in fitted and r.get("budget") == optimum["budget"]]
        n = np.array([r["parameters"] for r in mine], dtype=np.float64)
        loss = np.array([r[metric] for r in mine])
        sizes |= set(n.tolist())
        marker = "" if optimum["bracketed"] else " (optimum extrapolated)"
        left.scatter(n, loss, color=colour, label=f"C = {compact(optimum['budget'])}{marker}")
        coefficients = np.polyfit(np.log(n), loss, 2)
        grid = np.geomspace(n.min(), n.max(), 50)
        left.plot(grid, np.polyval(coefficients, np.log(grid)), color=colour, lw=1)
        if optimum["bracketed"]:
            left.axvline(optimum["n_opt"], color=colour, ls=":", lw=1)
        if optimum["n_interval"]:
            lo, hi = np.clip(optimum["n_interval"], n.min(), n.max())
            left.axvspan(lo, hi, color=colour, alpha=0.1, lw=0)
    left.set_xscale("log")
    readable_log_axis(left.xaxis, sorted(sizes))
    left.set_xlabel("parameters")
    left.set_ylabel(metric)
    left.legend(fontsize=7)
    _title(left, analysis, "isoFLOP curves")
    budgets = np.array([o["budget"] for o in optima])
    n_opt = np.array([o["n_opt"] for o in optima])
    for optimum in optima:
        style = (
            {"fmt": "o", "color": "k"}
            if optimum["used_in_fit"]
            else {"fmt": "o", "mfc": "none", "color": "grey"}
        )
        lo, hi = optimum["n_interval"] or (optimum["n_opt"], optimum["n_opt"])
        right.errorbar(
            [optimum["budget"]],
            [optimum["n_opt"]],
            yerr=[[max(optimum["n_opt"] - lo, 0)], [max(hi - optimum["n_opt"], 0)]],
            **style,
        )
    if not all(o["used_in_fit"] for o in optima):
        right.plot(
            [], [], "o", mfc="none", color="grey", label="optimum outside the sizes tried (not fitted)"
        )
    if "optimal_size" in analysis:
        fit = analysis["optimal_size"]
        span = (
            np.asarray(fit["band"]["compute"])
            if fit["band"]
            else np.geomspace(budgets.min(), budgets.max(), 40)
        )
        interval = (
            f" [{fit['alpha_interval'][0]:.2f}, {fit['alpha_interval'][1]:.2f}]"
            if fit["alpha_interval"]
            else " (no interval)"
        )
        right.plot(span, fit["k"] * span ** fit["alpha"], "k--", label=f"N* ~ C^{fit['alpha']:.2f}{interval}")
        if fit["band"]:
            right.fill_between(span, fit["band"]["lo"], fit["band"]["hi"], color="k", alpha=0.1, lw=0)
    right.legend(fontsize=7)
    right.set_xscale("log")
    right.set_yscale("log")
    readable_log_axis(right.xaxis, budgets.tolist())
    readable_log_axis(right.yaxis, [*sorted(sizes), *n_opt.tolist()], most=5)
    right.set_xlabel("training compute (FLOPs)")
    right.set_ylabel("compute-optimal parameters")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return [path]
