"""Sweep plans in both compute conventions, spec errors, and fits that recover known exponents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fitscale.cli import main
from fitscale.models.config import build_config
from fitscale.models.flops import paper_gflops, training_flops
from fitscale.sweep import SweepModel, SweepSpec, fit_optimal_size, fit_power_law, isoflop_optimum, plan_sweep
from fitscale.sweep.report import analyse


def test_plan_of_the_paper_sizes_shows_both_compute_conventions(capsys):
    assert main(["sweep", "plan", "recipes/scaling/fitv2_paper.yaml", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = {row["run"]: row for row in plan["runs"]}
    assert len(rows) == 9
    # The paper's GFLOPs of B / XL / 3B (27.3 / 147 / 653) from the model's own shapes.
    for model, quoted in (("b", 27.3), ("xl", 147.0), ("3b", 653.0)):
        row = rows[f"{model}-s400000"]
        assert row["paper_gflops"] == pytest.approx(quoted, rel=0.005)
        # Paper convention: GFLOPs x batch x steps x 3.
        assert row["paper_compute"] == pytest.approx(row["paper_gflops"] * 1e9 * 256 * 400_000 * 3, rel=1e-3)
        config = build_config({"b": "fitv2-b", "xl": "fitv2-xl", "3b": "fitv2-3b"}[model])
        assert row["training_flops"] == training_flops(config, [256] * 256) * 400_000
        # Ours counts 2 FLOPs per multiply-add plus attention: a bit over twice the paper's number.
        assert 2.0 < row["ratio_real_to_paper"] < 2.15
        assert row["gpu_hours"] == pytest.approx(row["training_flops"] / (0.4 * 989e12) / 3600)
    assert rows["xl-s400000"]["parameters"] == 671_045_776
    assert main(["sweep", "plan", "recipes/scaling/fitv2_paper.yaml"]) == 0
    table = capsys.readouterr().out
    assert "paper C (GFxBxSx3)" in table and "our FLOPs" in table and "xl-s400000" in table


def test_budget_grid_gives_steps_that_spend_the_budget():
    spec = SweepSpec(
        name="t",
        recipe="recipes/fitv2_b_256.yaml",
        out_dir="runs/t",
        mode="grid",
        models=[SweepModel("b", "fitv2-b"), SweepModel("xl", "fitv2-xl")],
        budgets=[1e19, 1e20],
    )
    runs = plan_sweep(spec)
    assert [r.name for r in runs] == ["b-C1e19", "b-C1e20", "xl-C1e19", "xl-C1e20"]
    for run in runs:
        assert run.training_flops == pytest.approx(run.budget, rel=1e-3)
        assert run.paper_gflops == paper_gflops(build_config(run.preset))


def test_spec_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrecipe: r.yaml\nout_dir: o\nmodels: [{name: a, preset: tiny}]\nbudget: [1]\n")
    assert main(["sweep", "plan", str(bad)]) == 2
    with pytest.raises(ValueError, match="mode grid needs `budgets`"):
        SweepSpec(name="x", recipe="r", out_dir="o", models=[SweepModel("a", "tiny")])
    with pytest.raises(ValueError, match=r"isoflop budget 1e\+18 names unknown models \['zz'\]"):
        SweepSpec(
            name="x",
            recipe="r",
            out_dir="o",
            models=[SweepModel("a", "tiny")],
            mode="isoflop",
            isoflop={1e18: ["a", "zz"]},
        )


def test_power_law_fit_recovers_known_exponents_from_noisy_losses():
    rng = np.random.default_rng(1)
    compute = np.geomspace(1e17, 1e21, 10)
    for a, b, c in ((40.0, 0.08, 0.45), (3e3, 0.2, 0.3)):
        loss = a * compute ** (-b) + c
        noisy = loss * (1 + rng.normal(0, 0.003, loss.shape))
        fit = fit_power_law(compute, noisy, bootstrap=100)
        assert fit.b == pytest.approx(b, rel=0.15)
        assert fit.c == pytest.approx(c, abs=0.05)
        assert fit.b_interval[0] <= b <= fit.b_interval[1]
        assert np.allclose(fit.predict(compute), loss, rtol=0.01)
    with pytest.raises(ValueError, match=">= 3"):
        fit_power_law([1.0, 2.0], [1.0, 0.5])


def test_isoflop_optima_recover_the_compute_optimal_exponent():
    """L(N, D) = E + A/N^alpha + B/D^beta with C = 6 N D: N* grows as C^(beta / (alpha + beta))."""
    E, A, B, alpha, beta = 1.7, 400.0, 4000.0, 0.34, 0.28
    rng = np.random.default_rng(0)
    optima, rows = [], []
    for budget in (1e18, 1e19, 1e20, 1e21):
        n_true = (alpha * A / (beta * B)) ** (1 / (alpha + beta)) * (budget / 6) ** (beta / (alpha + beta))
        sizes = n_true * np.geomspace(0.25, 4, 7)
        loss = E + A / sizes**alpha + B / (budget / (6 * sizes)) ** beta
        loss = loss + rng.normal(0, 1e-4, loss.shape)
        optimum = isoflop_optimum(budget, list(sizes), list(loss))
        assert optimum.bracketed and optimum.n_interval[0] <= optimum.n_opt <= optimum.n_interval[1]
        assert optimum.n_opt == pytest.approx(n_true, rel=0.25)
        optima.append(optimum)
        rows += [
            {
                "model": f"m{i}",
                "parameters": n,
                "budget": budget,
                "training_flops": budget,
                "status": "done",
                "step": 1,
                "val_loss_ema": value,
            }
            for i, (n, value) in enumerate(zip(sizes, loss))
        ]
    fit = fit_optimal_size(optima)
    assert fit.alpha == pytest.approx(beta / (alpha + beta), abs=0.03)
    assert fit.alpha_interval[0] < fit.alpha < fit.alpha_interval[1]
    analysis = analyse(rows, bootstrap=10)
    assert analysis["optimal_size"]["alpha"] == pytest.approx(fit.alpha, abs=1e-9)
    assert len(analysis["isoflop"]) == 4
