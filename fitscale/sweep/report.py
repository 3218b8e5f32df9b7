"""From collected results to fits: `fitscale sweep fit` (plots in fitscale.sweep.plots).

Reads `results.json` and
- chooses the metric (`auto`: the EMA's validation loss when every run's EMA has left its initial
  weights behind, else the raw weights' `val_loss`) and says why;
- keeps, per (size, budget), the learning rate with the best validation loss;
- fits L(C) per model size and for the compute frontier, the isoFLOP optimum at each budget with
  at least 3 sizes and N*(C) through the optima inside the sizes tried (extrapolated ones only
  when asked), and the joint law L(N, D);
- compares the held-out runs, which no fit sees, with the law's prediction;
then writes `fits.json` and the PNG plots next to the results.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from fitscale.errors import UserError
from fitscale.sweep.fit import IsoFlopOptimum, fit_optimal_size, fit_power_law, frontier, isoflop_optimum
from fitscale.sweep.law import PARAMETERS, LossLawFit, fit_loss_law
from fitscale.sweep.plots import plot_isoflop, plot_loss_vs_compute
from fitscale.sweep.rows import has_metric, partial_runs, training_compute, training_tokens, usable_rows

METRICS = ("val_loss_ema", "val_loss", "train_loss", "fid", "digits_frechet", "digits_error")
VALIDATION_METRICS = ("val_loss_ema", "val_loss", "fid", "digits_frechet", "digits_error")
EMA_INITIAL_LIMIT = 0.01  # an EMA still giving its initial weights more than this scores the init
BAND_POINTS = 40


def choose_metric(rows: list[dict[str, Any]], requested: str = "auto") -> tuple[str, str]:
    """(metric, why): `auto` takes `val_loss_ema` only where every run's EMA has forgotten its init."""
    scored = [r for r in rows if r.get("step")]
    if requested != "auto":
        if requested not in METRICS:
            raise UserError(f"--metric: {requested!r} is not one of auto, {', '.join(METRICS)}")
        reason = "asked for"
        if requested == "val_loss_ema":
            stale = [r for r in scored if (r.get("ema_initial_weight") or 0.0) > EMA_INITIAL_LIMIT]
            if stale:
                worst = max(stale, key=lambda r: r["ema_initial_weight"])
                reason += (
                    f"; warning: the EMA of {len(stale)} run(s) still weighs its initial weights "
                    f"(up to {worst['ema_initial_weight']:.0%}, {worst['run']}), train with optim.ema.warmup"
                )
        return requested, reason
    if not any(has_metric(r, "val_loss") or has_metric(r, "val_loss_ema") for r in scored):
        return "train_loss", "auto: no validation loss collected, so the mean training loss of the last steps"
    if not any(has_metric(r, "val_loss") for r in scored):
        return "val_loss_ema", "auto: the only validation loss collected (the EMA's)"
    known = [r.get("ema_initial_weight") for r in scored if has_metric(r, "val_loss_ema")]
    if known and len(known) == len(scored) and all(w is not None and w <= EMA_INITIAL_LIMIT for w in known):
        warmups = sorted({str(r.get("ema_warmup")) for r in scored})
        return "val_loss_ema", (
            f"auto: the EMA of every run gives its initial weights <= {EMA_INITIAL_LIMIT:.0%} weight "
            f"(EMA warmup {', '.join(warmups)}), so its validation loss means the same at every run length"
        )
    if not known or None in known:
        why = "some runs have no EMA, or were collected before `ema_initial_weight` was recorded"
    else:
        worst = max(
            (r for r in scored if has_metric(r, "val_loss_ema")), key=lambda r: r["ema_initial_weight"]
        )
        why = (
            f"the EMA of {worst['run']} still gives its initial weights {worst['ema_initial_weight']:.0%} "
            f"weight (EMA warmup {worst.get('ema_warmup')}, {worst['step']} steps)"
        )
    return "val_loss", f"auto: the raw weights' validation loss, because {why}"


def _group_key(row: dict[str, Any]) -> tuple:
    return (row["model"], row.get("budget") or None, None if row.get("budget") else row.get("steps"))


def select_learning_rates(
    rows: list[dict[str, Any]], metric: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the best run of each (size, budget or steps), the choices made where there was more than one lr).

    The best is the lowest validation metric (`metric` if it is one, else `val_loss`); a choice at
    the smallest or largest lr tried is flagged `at_edge` (the grid may not hold the best rate).
    """
    judge = metric if metric in VALIDATION_METRICS else "val_loss"
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[_group_key(row)].append(row)
    chosen, choices = [], []
    for (model, budget, steps), group in groups.items():
        judged = [r for r in group if has_metric(r, judge)] or group
        best = min(judged, key=lambda r: r.get(judge, r[metric]))
        chosen.append(best)
        rates = sorted({r["lr"] for r in judged if r.get("lr") is not None})
        if len(rates) > 1:
            choices.append(
                {
                    "model": model,
                    "budget": budget,
                    "steps": steps,
                    "lr": best["lr"],
                    "judged_on": judge,
                    "candidates": {f"{r['lr']:.4g}": r.get(judge, r[metric]) for r in judged},
                    "at_edge": best["lr"] in (rates[0], rates[-1]),
                }
            )
    order = {id(r): i for i, r in enumerate(rows)}
    return sorted(chosen, key=lambda r: order[id(r)]), choices


def _band(fit, span: np.ndarray) -> dict[str, list[float]] | None:
    band = fit.band(span)
    if band is None:
        return None
    return {"compute": span.tolist(), "lo": band[0].tolist(), "hi": band[1].tolist()}


def fit_law(rows: list[dict[str, Any]], metric: str, bootstrap: int = 200) -> LossLawFit | str:
    """L(N, D) through `rows` (already one per size and budget); a string says why it cannot be fitted."""
    if len(rows) < PARAMETERS or len({r["parameters"] for r in rows}) < 2:
        return f"L(N, D): needs >= {PARAMETERS} runs of >= 2 sizes, got {len(rows)}"
    return fit_loss_law(
        [r["parameters"] for r in rows],
        [training_tokens(r) for r in rows],
        [r[metric] for r in rows],
        bootstrap,
    )


def prepare(rows: list[dict[str, Any]], metric: str = "auto") -> tuple[str, str, list, list]:
    """(metric, why, the fitted runs: best lr of each size and budget, the lr choices)."""
    metric, reason = choose_metric(rows, metric)
    usable = usable_rows(rows, metric)
    if not usable and not any(r.get("status") == "done" for r in rows):
        raise UserError("no run of this sweep has finished training; run `fitscale sweep launch` first")
    if not usable:
        raise UserError(
            f"no finished run has a `{metric}` value; run `fitscale sweep collect` (with the spec's "
            f"validation / digits_quality / fid section that gives it; metrics: {', '.join(METRICS)})"
        )
    chosen, choices = select_learning_rates(usable, metric)
    return metric, reason, chosen, choices


def analyse(
    rows: list[dict[str, Any]],
    metric: str = "auto",
    bootstrap: int = 200,
    include_extrapolated: bool = False,
) -> dict[str, Any]:
    """Fits of the metric against training compute (ours); parts without enough runs are listed as skipped."""
    metric, reason, usable, choices = prepare(rows, metric)
    result: dict[str, Any] = {
        "metric": metric,
        "metric_reason": reason,
        "lr_choice": choices,
        "per_model": {},
        "skipped": partial_runs(rows),
        "include_extrapolated": include_extrapolated,
        "fitted_runs": [r["run"] for r in usable],
    }
    span = np.geomspace(
        min(training_compute(r) for r in usable), max(training_compute(r) for r in usable), BAND_POINTS
    )
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in usable:
        by_model[row["model"]].append(row)
    for model, model_rows in by_model.items():
        if len({training_compute(r) for r in model_rows}) < 3:
            result["skipped"].append(f"L(C) of {model}: needs runs at >= 3 compute values")
            continue
        fit = fit_power_law(
            [training_compute(r) for r in model_rows], [r[metric] for r in model_rows], bootstrap
        )
        result["per_model"][model] = {
            **fit.to_dict(),
            "parameters": model_rows[0]["parameters"],
            "band": _band(fit, span),
        }
    front = frontier([(training_compute(r), r[metric]) for r in usable])
    result["frontier_points"] = front
    if len(front) >= 3:
        fit = fit_power_law(*zip(*front), bootstrap=bootstrap)
        result["frontier"] = {**fit.to_dict(), "band": _band(fit, span)}
    else:
        result["skipped"].append("frontier L(C): needs >= 3 frontier points")
    _isoflop(result, usable, metric, bootstrap, include_extrapolated)
    law = fit_law(usable, metric, bootstrap)
    if isinstance(law, str):
        result["skipped"].append(law)
        law = None
    else:
        result["law"] = law.to_dict()
    result["held_out"] = compare_held_out(rows, metric, law)
    return result


def _isoflop(
    result: dict[str, Any], usable: list[dict[str, Any]], metric: str, bootstrap: int, include: bool
) -> None:
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
    used = [o for o in optima if o.bracketed or include]
    result["isoflop"] = [{**vars(o), "used_in_fit": o in used} for o in optima]
    for o in optima:
        if not o.bracketed:
            result["skipped"].append(
                f"isoFLOP at {o.budget:.2e}: the optimum {o.n_opt:.3g} lies outside the sizes tried "
                f"[{o.n_range[0]:.3g}, {o.n_range[1]:.3g}] (an extrapolation); "
                + (
                    "kept in N*(C) as asked"
                    if include
                    else "left out of N*(C) (--include-extrapolated keeps it)"
                )
            )
    if len(used) >= 2:
        fit = fit_optimal_size(used)
        span = np.geomspace(min(o.budget for o in used), max(o.budget for o in used), BAND_POINTS)
        result["optimal_size"] = {**fit.to_dict(), "band": _band(fit, span)}
    else:
        result["skipped"].append("N*(C): needs isoFLOP optima inside the sizes tried at >= 2 budgets")


def compare_held_out(rows: list[dict[str, Any]], metric: str, law: LossLawFit | None) -> list[dict[str, Any]]:
    """Each held-out run's measured metric against the law's prediction at its N and D."""
    out = []
    for row in rows:
        if not row.get("held_out"):
            continue
        entry: dict[str, Any] = {"run": row["run"], "parameters": row["parameters"]}
        if not has_metric(row, metric):
            out.append({**entry, "note": f"not trained or no `{metric}` yet"})
            continue
        if row.get("status") != "done":
            out.append(
                {**entry, "note": f"{row.get('status')} (step {row.get('step')} of {row.get('steps')})"}
            )
            continue
        entry.update(tokens=training_tokens(row), compute=training_compute(row), measured=row[metric])
        if law is None:
            out.append({**entry, "note": "no L(N, D) fit to predict it"})
            continue
        predicted = float(law.predict(row["parameters"], entry["tokens"]))
        interval = law.interval(row["parameters"], entry["tokens"])
        entry.update(
            predicted=predicted,
            interval=interval,
            error_percent=100.0 * (predicted - row[metric]) / row[metric],
            within=None if interval is None else bool(interval[0] <= row[metric] <= interval[1]),
        )
        out.append(entry)
    return out


def write_report(
    rows: list[dict[str, Any]],
    out_dir: str | Path,
    metric: str = "auto",
    include_extrapolated: bool = False,
    analysis: dict[str, Any] | None = None,
) -> list[Path]:
    """`fits.json` and the PNG plots in `out_dir`; returns the files written."""
    out_dir = Path(out_dir)
    analysis = analysis or analyse(rows, metric, include_extrapolated=include_extrapolated)
    written = [out_dir / "fits.json"]
    written[0].write_text(json.dumps(analysis, indent=1))
    written += plot_loss_vs_compute(rows, analysis, out_dir / "loss_vs_compute.png")
    if analysis["isoflop"]:
        written += plot_isoflop(rows, analysis, out_dir / "isoflop.png")
    return written
