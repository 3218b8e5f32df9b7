"""Accessors of one collected sweep row (a dict of `fitscale sweep collect`'s table), shared by the
analysis (fitscale/sweep/report.py) and the plots (fitscale/sweep/plots.py)."""

from __future__ import annotations

from typing import Any


def has_metric(row: dict[str, Any], metric: str) -> bool:
    """Whether the row holds a number for `metric` and has trained (its `step` is not 0 or missing)."""
    return isinstance(row.get(metric), (int, float)) and bool(row.get("step"))


def usable_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Finished runs with a value of `metric`, held-out runs left out. A partly trained run is left
    out too: its checkpoint sits mid-way through its own learning-rate schedule, which is not a
    finished run at the compute it has spent (`partial_runs` names them)."""
    return [r for r in rows if has_metric(r, metric) and not r.get("held_out") and r.get("status") == "done"]


def partial_runs(rows: list[dict[str, Any]]) -> list[str]:
    """`RUN: partial (step S of N), left out` for each collected run that has not reached its steps."""
    return [
        f"{r['run']}: partial (step {r.get('step')} of {r.get('steps')}), left out; launch the sweep again to finish it"
        for r in rows
        if r.get("status") == "partial"
    ]


def training_compute(row: dict[str, Any]) -> float:
    """Training FLOPs the run has done (`training_flops_done`), else those it plans (`training_flops`)."""
    return float(row.get("training_flops_done") or row["training_flops"])


def training_tokens(row: dict[str, Any]) -> float:
    """Training tokens done: steps x images per step x tokens per image."""
    return float(row["step"]) * row["global_batch_size"] * row["tokens_per_image"]
