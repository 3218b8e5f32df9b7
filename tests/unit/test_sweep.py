"""Sweep plans in both compute conventions, spec errors, and fits that recover known exponents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fitscale.cli import main
from fitscale.config.model import build_config
from fitscale.errors import UserError
from fitscale.models.flops import paper_gflops, training_flops
from fitscale.sweep import SweepModel, SweepSpec, fit_optimal_size, fit_power_law, isoflop_optimum, plan_sweep
from fitscale.sweep.report import analyse
from fitscale.sweep.spec import HeldOutRun


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
                "run": f"m{i}-{budget:g}",
                "model": f"m{i}",
                "parameters": n,
                "budget": budget,
                "training_flops": budget,
                "global_batch_size": 1,
                "tokens_per_image": 1,
                "status": "done",
                "step": int(budget / (6 * n)),
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


# ---- learning-rate axis, honest intervals, held-out predictions (synthetic results) --------------

LAW = {"E": 0.25, "A": 40.0, "alpha": 0.45, "B": 90.0, "beta": 0.38}  # L(N, D) the synthetic runs follow


def law_loss(parameters: float, tokens: float) -> float:
    return LAW["E"] + LAW["A"] * parameters ** -LAW["alpha"] + LAW["B"] * tokens ** -LAW["beta"]


def write_spec(tmp_path, body: str):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        f"name: synthetic\nrecipe: recipes/demo.yaml\nout_dir: {tmp_path / 'out'}\nglobal_batch_size: 16\n"
        "tokens_per_image: 100\n" + body
    )
    return spec


def synthetic_results(spec_path, noise: float = 0.004, lr_best: float = 1.0, seed: int = 0) -> list[dict]:
    """results.json of every planned run: the law's loss, times a penalty for lr away from the best
    rate of its width (lr_best / width * 64), times 1 + noise; the EMA has forgotten its init."""
    from fitscale.sweep import load_spec, plan_sweep

    spec = load_spec(spec_path)
    rng = np.random.default_rng(seed)
    rows = []
    for run in plan_sweep(spec):
        loss = law_loss(run.parameters, run.tokens)
        if run.lr is not None:
            loss *= 1 + 0.05 * np.log(run.lr / (lr_best * 64 / run.width * 2e-3)) ** 2
        loss *= 1 + rng.normal(0, noise)
        row = {**run.row(spec.mfu, spec.peak_flops), "status": "done", "step": run.steps}
        row.update(val_loss=loss, val_loss_ema=loss, ema_warmup="power", ema_initial_weight=0.0)
        rows.append(row)
    out = tmp_out = spec_path.parent / "out"
    tmp_out.mkdir(exist_ok=True)
    (out / "results.json").write_text(json.dumps({"sweep": spec.name, "runs": rows}))
    return rows


WIDTHS = """models:
  - {name: w32, preset: tiny, overrides: {hidden_size: 32, num_heads: 2, adaln_lora_rank: 8}}
  - {name: w64, preset: tiny, overrides: {hidden_size: 64}}
  - {name: w96, preset: tiny, overrides: {hidden_size: 96, num_heads: 4, adaln_lora_rank: 24}}
"""


def test_learning_rate_axis_plans_a_grid_per_width_and_fit_keeps_the_best_run(tmp_path):
    from fitscale.sweep.spec import load_spec, run_overrides

    spec_path = write_spec(
        tmp_path,
        WIDTHS + "budgets: [1.0e+11, 3.0e+11]\n"
        "lr: {base: 2.0e-3, base_width: 64, width_exponent: -1, multipliers: [0.5, 1, 2]}\n",
    )
    spec = load_spec(spec_path)
    runs = plan_sweep(spec)
    assert len(runs) == 3 * 2 * 3
    w32 = [r for r in runs if r.model == "w32" and r.budget == 1e11]
    # lr = 2e-3 * (32 / 64)^-1 * multiplier
    assert [r.lr for r in w32] == pytest.approx([2e-3, 4e-3, 8e-3])
    assert [r.name for r in w32] == ["w32-C1e11-lr0.002", "w32-C1e11-lr0.004", "w32-C1e11-lr0.008"]
    assert "optim.lr=0.008" in run_overrides(spec, w32[2])
    # The best rate is the rule's value times 2 at every width (the edge of the grid: flagged).
    rows = synthetic_results(spec_path, noise=0.0, lr_best=2.0)
    analysis = analyse(rows, bootstrap=5)
    assert len(analysis["lr_choice"]) == 6
    for choice in analysis["lr_choice"]:
        width = {"w32": 32, "w64": 64, "w96": 96}[choice["model"]]
        assert choice["lr"] == pytest.approx(2e-3 * 64 / width * 2)
        assert choice["at_edge"] and choice["judged_on"] == "val_loss_ema"
        assert min(choice["candidates"].values()) == choice["candidates"][f"{choice['lr']:.4g}"]
    best = {r["run"] for r in rows if r["lr"] == pytest.approx(2e-3 * 64 / r["width"] * 2)}
    assert set(analysis["fitted_runs"]) == best
    # A per-model grid replaces the rule for that model.
    spec_path.write_text(
        spec_path.read_text().replace("hidden_size: 64}}", "hidden_size: 64}, lrs: [1.0e-3]}")
    )
    assert {r.lr for r in plan_sweep(load_spec(spec_path)) if r.model == "w64"} == {1e-3}


def test_fits_with_as_many_points_as_parameters_report_no_interval(tmp_path, capsys):
    fit = fit_power_law([1e10, 3e10, 1e11], [1.0, 0.8, 0.7])
    assert fit.b_interval is None and fit.c_interval is None and fit.band(np.array([1e10])) is None
    assert fit.interval_note.startswith("no interval: 3 points for the 3 parameters of L = a C^-b + c")
    optimum = isoflop_optimum(1e11, [1e4, 3e4, 1e5], [1.0, 0.9, 1.0])
    assert optimum.n_interval is None and "3 points for the 3 parameters" in optimum.interval_note
    assert fit_power_law([1e10, 3e10, 1e11, 3e11], [1.0, 0.8, 0.7, 0.66]).b_interval is not None
    spec = write_spec(tmp_path, WIDTHS + "budgets: [1.0e+11, 3.0e+11, 1.0e+12]\n")
    synthetic_results(spec)
    assert main(["sweep", "fit", str(spec), "--bootstrap", "30"]) == 0
    out = capsys.readouterr().out
    assert "w32: L = " in out and "(no interval)" in out and "b in [" not in out.split("frontier")[0]
    assert "no interval: 3 points for the 3 parameters of L = a C^-b + c" in out
    fits = json.loads((tmp_path / "out" / "fits.json").read_text())
    assert fits["per_model"]["w32"]["b_interval"] is None and fits["per_model"]["w32"]["band"] is None


def test_isoflop_optima_outside_the_sizes_tried_are_left_out_of_the_optimal_size_fit():
    """At the largest budget every size is too small: its vertex extrapolates and stays out of N*(C)."""
    E, A, B, alpha, beta = 1.7, 400.0, 4000.0, 0.34, 0.28
    sizes = np.geomspace(1e6, 1.6e7, 5)
    rows = []
    for budget in (1e18, 3e18, 1e19, 1e21):  # N* = 2.0M, 3.3M, 5.7M and 46M
        loss = E + A / sizes**alpha + B / (budget / (6 * sizes)) ** beta
        rows += [
            {"run": f"m{i}-{budget:g}", "model": f"m{i}", "parameters": n, "budget": budget,
             "training_flops": budget, "global_batch_size": 1, "tokens_per_image": 1, "status": "done",
             "step": int(budget / (6 * n)), "val_loss": value}
            for i, (n, value) in enumerate(zip(sizes, loss))
        ]  # fmt: skip
    analysis = analyse(rows, "val_loss", bootstrap=20)
    used = {o["budget"]: o["used_in_fit"] for o in analysis["isoflop"]}
    outside = [o for o in analysis["isoflop"] if not o["bracketed"]]
    assert [o["budget"] for o in outside] == [1e21] and outside[0]["n_opt"] > sizes[-1]
    assert used == {1e18: True, 3e18: True, 1e19: True, 1e21: False}
    assert analysis["optimal_size"]["points"] == 3
    assert any("lies outside the sizes tried" in s and "left out of N*(C)" in s for s in analysis["skipped"])
    included = analyse(rows, "val_loss", bootstrap=20, include_extrapolated=True)
    assert included["optimal_size"]["points"] == 4


def test_auto_metric_is_the_raw_loss_while_an_ema_still_holds_its_initial_weights():
    from fitscale.sweep.report import choose_metric

    rows = [
        {"run": "a", "step": 24, "val_loss": 0.3, "val_loss_ema": 1.2, "ema_warmup": "none", "ema_initial_weight": 0.79},
        {"run": "b", "step": 900, "val_loss": 0.2, "val_loss_ema": 0.2, "ema_warmup": "none", "ema_initial_weight": 0.0},
    ]  # fmt: skip
    metric, reason = choose_metric(rows)
    assert metric == "val_loss" and "a still gives its initial weights 79% weight" in reason
    metric, reason = choose_metric(rows, "val_loss_ema")
    assert metric == "val_loss_ema" and "warning" in reason
    rows[0].update(ema_warmup="power", ema_initial_weight=0.0)
    assert choose_metric(rows)[0] == "val_loss_ema"


def test_predict_recovers_a_synthetic_law_within_its_interval_and_fit_checks_the_held_out_run(
    tmp_path, capsys
):
    spec = write_spec(
        tmp_path,
        WIDTHS
        + "  - {name: w48, preset: tiny, overrides: {hidden_size: 48, num_heads: 3, adaln_lora_rank: 12}}\n"
        "budgets: [1.0e+11, 3.0e+11, 1.0e+12]\n"
        "held_out: [{name: w128, preset: tiny, overrides: {hidden_size: 128, num_heads: 4}, budget: 3.0e+12}]\n",
    )
    rows = synthetic_results(spec)
    held = next(r for r in rows if r["held_out"])
    args = [
        "--preset",
        "tiny",
        "--overrides",
        "hidden_size=128",
        "num_heads=4",
        "--budget",
        "3e12",
        "--json",
        "--bootstrap",
        "50",
    ]
    assert main(["sweep", "predict", str(spec), *args]) == 0
    predicted = json.loads(capsys.readouterr().out)
    assert predicted["parameters"] == held["parameters"] and predicted["tokens"] == held["tokens"]
    truth = law_loss(held["parameters"], held["tokens"])
    lo, hi = predicted["interval"]
    assert lo < truth < hi and predicted["predicted"] == pytest.approx(truth, rel=0.02)
    assert hi - lo < 0.1 * truth  # informative, not a blanket
    # `fit` never sees the held-out run, and compares it with the same prediction.
    assert main(["sweep", "fit", str(spec), "--json", "--bootstrap", "50"]) == 0
    analysis = json.loads(capsys.readouterr().out)
    assert held["run"] not in analysis["fitted_runs"]
    (compared,) = analysis["held_out"]
    assert compared["predicted"] == pytest.approx(predicted["predicted"])
    assert compared["measured"] == held["val_loss_ema"]
    assert compared["within"] == (lo <= held["val_loss_ema"] <= hi)
    assert compared["error_percent"] == pytest.approx(
        100 * (predicted["predicted"] / held["val_loss_ema"] - 1)
    )
    assert analysis["metric"] == "val_loss_ema" and "forgotten" not in analysis["metric_reason"]
    for name in ("fits.json", "loss_vs_compute.png", "isoflop.png"):
        assert (tmp_path / "out" / name).is_file()
    assert (
        main(["sweep", "predict", str(spec), "--preset", "tiny", "--overrides", "depth", "--steps", "5"]) == 2
    )
    assert "--overrides: override 'depth' must look like field=value, e.g. depth=4" in capsys.readouterr().err


def test_log_axis_ticks_are_the_values_tried_without_overlapping_labels():
    """Runs' compute differs from the budget by a step's rounding: one tick per budget, short labels."""
    from fitscale.plotting import pyplot
    from fitscale.sweep.plots import compact, readable_log_axis

    plt = pyplot()
    figure, axes = plt.subplots()
    axes.set_xscale("log")
    readable_log_axis(axes.xaxis, [5.99e10, 6.04e10, 1.8e11, 1.79e11, 5.4e11, 1.08e12])
    assert list(axes.xaxis.get_major_locator().tick_values(0, 1)) == [5.99e10, 1.79e11, 5.4e11, 1.08e12]
    assert [compact(v) for v in (5.99e10, 1.08e12, 171_000, 6.4, 1.0e12)] == [
        "6e10",
        "1.1e12",
        "171K",
        "6.4",
        "1e12",
    ]
    # Values a few percent apart on an axis spanning decades get one label.
    readable_log_axis(axes.yaxis, [6.64, 171_000, 208_000])
    assert list(axes.yaxis.get_major_locator().tick_values(0, 1)) == [6.64, 171_000]
    plt.close(figure)


def test_compute_optimal_digits_spec_spans_1_to_100_tokens_per_parameter_at_every_budget():
    from fitscale.sweep import load_spec

    spec = load_spec("recipes/scaling/digits_compute_optimal.yaml")
    runs = [r for r in plan_sweep(spec) if not r.held_out]
    ratios: dict[float, list[float]] = {}
    for run in runs:
        ratios.setdefault(run.budget, []).append(run.tokens / run.parameters)
    assert len(ratios) >= 3
    for budget, tried in ratios.items():  # each budget brackets the ratios where its optimum may lie
        assert min(tried) < 3 and max(tried) > 25 and len(set(tried)) >= 4, budget
    assert 0.5 < min(min(t) for t in ratios.values()) and max(max(t) for t in ratios.values()) < 130
    assert spec.digits_quality["per_class"] == 4
    with pytest.raises(
        ValueError, match=r"^sweep 'x': unknown digits_quality keys \['sampler_steps'\]; known: "
    ):
        SweepSpec(
            name="x",
            recipe="r",
            out_dir="o",
            models=[SweepModel("a", "tiny")],
            budgets=[1.0],
            digits_quality={"sampler_steps": 4},
        )


def test_partly_trained_runs_are_left_out_of_every_fit_and_named(tmp_path, capsys):
    """A run stopped mid-schedule (its cosine decay not finished) is no finished run at the compute it
    spent: fit leaves it out of the rate choice and the laws, and says so; a partial held-out run is
    not compared with the law."""
    spec = write_spec(
        tmp_path,
        WIDTHS + "budgets: [1.0e+11, 3.0e+11, 1.0e+12]\n"
        "held_out:\n  - {name: big, preset: tiny, overrides: {hidden_size: 128}, budget: 3.0e+12}\n",
    )
    rows = synthetic_results(spec)
    stopped = next(r for r in rows if r["run"] == "w64-C1e12")
    stopped.update(status="partial", step=stopped["steps"] // 4, val_loss_ema=0.01)  # would win every choice
    held = next(r for r in rows if r["held_out"])
    held.update(status="partial", step=7)
    (tmp_path / "out" / "results.json").write_text(json.dumps({"sweep": "synthetic", "runs": rows}))
    assert main(["sweep", "fit", str(spec), "--bootstrap", "30", "--json"]) == 0
    fits = json.loads(capsys.readouterr().out)
    assert "w64-C1e12" not in fits["fitted_runs"] and len(fits["fitted_runs"]) == 8
    steps = stopped["steps"]
    assert (
        f"w64-C1e12: partial (step {steps // 4} of {steps}), left out; launch the sweep again to finish it"
        in (fits["skipped"])
    )
    assert fits["held_out"] == [{"run": "big-C3e12", "parameters": held["parameters"],
                                 "note": f"partial (step 7 of {held['steps']})"}]  # fmt: skip


def test_fit_before_any_run_finished_and_bad_fit_arguments_say_what_to_do(tmp_path, capsys):
    spec = write_spec(tmp_path, WIDTHS + "budgets: [1.0e+11, 3.0e+11, 1.0e+12]\n")
    rows = synthetic_results(spec)
    for row in rows:
        row["status"] = "new"
    (tmp_path / "out" / "results.json").write_text(json.dumps({"sweep": "synthetic", "runs": rows}))
    assert main(["sweep", "fit", str(spec)]) == 2
    assert capsys.readouterr().err.strip() == (
        "fitscale sweep: error: no run of this sweep has finished training; run `fitscale sweep launch` first"
    )
    synthetic_results(spec)
    assert main(["sweep", "fit", str(spec), "--metric", "digits_frechet"]) == 2
    assert (
        "no finished run has a `digits_frechet` value; run `fitscale sweep collect`"
        in capsys.readouterr().err
    )
    assert main(["sweep", "fit", str(spec), "--bootstrap", "-1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fitscale sweep: error: --bootstrap must be >= 0 (0: fits without intervals), got -1"
    )
    with pytest.raises(UserError, match=r"^held_out 'h': lr must be > 0, got -0.002$"):
        HeldOutRun(name="h", preset="tiny", budget=1e12, lr=-2e-3)
