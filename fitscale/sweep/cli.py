"""`fitscale sweep plan|launch|collect|fit|predict SPEC`: scaling-law sweeps from a YAML spec."""

from __future__ import annotations

import json

from fitscale.errors import UserError


def register(subparsers) -> None:
    """Add `fitscale sweep` and its subcommands (plan, launch, collect, fit, predict) to `subparsers`."""
    sweep = subparsers.add_parser("sweep", help="scaling-law sweeps: plan, launch, collect, fit")
    commands = sweep.add_subparsers(dest="sweep_command", metavar="SUBCOMMAND", required=True)

    plan = commands.add_parser(
        "plan", help="the table of runs: parameters, steps, FLOPs (ours and the paper's), GPU-hours"
    )
    plan.add_argument("spec", help="sweep spec YAML (see recipes/scaling/)")
    plan.add_argument("--json", action="store_true", help="print the rows as JSON")
    plan.set_defaults(func=run_plan)

    launch = commands.add_parser("launch", help="start every unfinished run (SLURM job array, or --local)")
    launch.add_argument("spec")
    launch.add_argument(
        "--cluster", default=None, help="cluster profile; default: the recipe's launch.cluster"
    )
    launch.add_argument(
        "--local", action="store_true", help="train the runs one after another in this process"
    )
    launch.add_argument(
        "--only", action="append", default=[], metavar="RUN", help="launch only this run (repeatable)"
    )
    launch.add_argument("--json", action="store_true")
    launch.set_defaults(func=run_launch)

    collect = commands.add_parser(
        "collect", help="final train / validation (raw and EMA) losses, FID if configured"
    )
    collect.add_argument("spec")
    collect.add_argument("--device", default="auto", help="auto, cpu or cuda")
    collect.add_argument("--json", action="store_true")
    collect.set_defaults(func=run_collect)

    fit = commands.add_parser(
        "fit",
        help="best lr per size and budget; L(C) per size and frontier, isoFLOP optima, N*(C), L(N, D), "
        "held-out runs predicted vs measured; fits.json and PNG plots",
    )
    fit.add_argument("spec")
    fit.add_argument(
        "--metric",
        default=None,
        help="auto (val_loss_ema where every run's EMA has forgotten its init, else val_loss), "
        "val_loss_ema, val_loss, train_loss, fid, digits_frechet or digits_error; default: the spec's `metric` (auto)",
    )
    fit.add_argument(
        "--include-extrapolated",
        action="store_true",
        help="let isoFLOP optima outside the sizes tried into N*(C) (or the spec's include_extrapolated)",
    )
    fit.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits per interval (default 200)")
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(func=run_fit)

    predict = commands.add_parser(
        "predict", help="the L(N, D) fit's loss, with its prediction interval, for a model at a budget"
    )
    predict.add_argument("spec")
    predict.add_argument("--preset", required=True, help="model preset, e.g. tiny or fitv2-xl")
    predict.add_argument(
        "--overrides",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="ModelConfig fields, e.g. hidden_size=128 num_heads=4",
    )
    size = predict.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", type=float, help="training FLOPs (ours)")
    size.add_argument("--steps", type=int, help="optimizer steps")
    predict.add_argument("--metric", default=None, help="as for `fit`")
    predict.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits (default 200)")
    predict.add_argument("--json", action="store_true")
    predict.set_defaults(func=run_predict)


def run_plan(args) -> int:
    """`fitscale sweep plan`: print the table of planned runs (parameters, steps, FLOPs, GPU-hours) or
    JSON; exit status 0.
    """
    from fitscale.sweep.spec import format_plan, load_spec, plan_sweep, total_gpu_hours

    spec = load_spec(args.spec)
    runs = plan_sweep(spec)
    rows = [run.row(spec.mfu, spec.peak_flops) for run in runs]
    if args.json:
        print(
            json.dumps(
                {"sweep": spec.name, "mfu": spec.mfu, "peak_flops": spec.peak_flops, "runs": rows}, indent=1
            )
        )
        return 0
    print(
        f"sweep {spec.name}: {len(runs)} runs from {spec.recipe}, batch {runs[0].global_batch_size}, "
        f"{spec.tokens_per_image} tokens per image"
    )
    print(format_plan(rows))
    print(
        f"total {total_gpu_hours(runs, spec):,.1f} GPU-hours at {spec.mfu:.0%} MFU of {spec.peak_flops:.3g} FLOP/s; "
        "paper C = GFLOPs x batch x steps x 3 (multiply-adds); ours = 2 FLOPs per multiply-add, attention included"
    )
    return 0


def run_launch(args) -> int:
    """`fitscale sweep launch`: start every unfinished run of the spec (SLURM job array or --local);
    exit status 0, or 128 + the signal's number when an exit signal stopped a --local sweep.
    """
    import signal

    from fitscale.sweep.launch import launch_sweep
    from fitscale.sweep.spec import load_spec

    outcome = launch_sweep(load_spec(args.spec), args.cluster, args.local, args.only or None)
    print(json.dumps(outcome, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in outcome.items()))
    stopped = [v.split()[2] for v in outcome.values() if v.startswith("stopped by ")]
    return 128 + signal.Signals[stopped[0]].value if stopped else 0


def run_collect(args) -> int:
    """`fitscale sweep collect`: gather every run's outcome into results.json and print it; exit status 0."""
    from fitscale.sweep.collect import collect_sweep
    from fitscale.sweep.spec import load_spec

    spec = load_spec(args.spec)
    rows = collect_sweep(spec, args.device)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for row in rows:
        values = ", ".join(
            f"{k} {row[k]:.4f}"
            for k in ("train_loss", "val_loss", "val_loss_ema", "fid")
            if row.get(k) is not None
        )
        print(f"{row['run']}: {row['status']} (step {row['step']}) {values}")
    return 0


def _interval(fit: dict, key: str, digits: int = 3) -> str:
    value = fit.get(f"{key}_interval")
    if value is None:
        return "no interval" if fit.get("interval_note") else "no interval (no bootstrap)"
    return f"{key} in [{value[0]:.{digits}f}, {value[1]:.{digits}f}]"


def run_fit(args) -> int:
    """`fitscale sweep fit`: fit the scaling laws to the collected results, write fits.json and the
    plots, print the fits; exit status 0.
    """
    from fitscale.sweep.collect import read_results
    from fitscale.sweep.report import analyse, write_report
    from fitscale.sweep.spec import load_spec

    check_bootstrap(args.bootstrap)
    spec = load_spec(args.spec)
    rows = read_results(spec)
    include = args.include_extrapolated or spec.include_extrapolated
    analysis = analyse(rows, args.metric or spec.metric, args.bootstrap, include_extrapolated=include)
    files = write_report(rows, spec.out_dir, analysis=analysis)
    if args.json:
        print(json.dumps({**analysis, "files": [str(f) for f in files]}, indent=1))
        return 0
    print(f"metric: {analysis['metric']} ({analysis['metric_reason']})")
    for choice in analysis["lr_choice"]:
        at = f"C {choice['budget']:.3g}" if choice["budget"] else f"{choice['steps']} steps"
        tried = ", ".join(f"{lr}: {value:.4f}" for lr, value in choice["candidates"].items())
        edge = ", at the edge of the grid" if choice["at_edge"] else ""
        print(f"lr of {choice['model']} at {at}: {choice['lr']:.4g} ({choice['judged_on']} {tried}{edge})")
    notes = set()
    for model, fit in analysis["per_model"].items():
        print(f"{model}: L = {fit['a']:.4g} C^-{fit['b']:.4f} + {fit['c']:.4f}  ({_interval(fit, 'b')})")
        notes.add(fit["interval_note"])
    if "frontier" in analysis:
        fit = analysis["frontier"]
        print(f"frontier: L = {fit['a']:.4g} C^-{fit['b']:.4f} + {fit['c']:.4f}  ({_interval(fit, 'b')})")
        notes.add(fit["interval_note"])
    if "optimal_size" in analysis:
        fit = analysis["optimal_size"]
        print(f"compute-optimal size: N* = {fit['k']:.4g} C^{fit['alpha']:.3f} ({_interval(fit, 'alpha')})")
        notes.add(fit["interval_note"])
    if "law" in analysis:
        fit = analysis["law"]
        print(
            f"L(N, D) = {fit['E']:.4f} + {fit['A']:.4g} N^-{fit['alpha']:.3f} + {fit['B']:.4g} D^-{fit['beta']:.3f}"
            f"  ({_interval(fit, 'alpha')}, {_interval(fit, 'beta')})"
        )
        notes.add(fit["interval_note"])
    for held in analysis["held_out"]:
        if "predicted" in held:
            interval = held["interval"]
            band = f"[{interval[0]:.4f}, {interval[1]:.4f}]" if interval else "no interval"
            inside = "" if interval is None else (" inside" if held["within"] else " OUTSIDE")
            print(
                f"held out {held['run']}: measured {held['measured']:.4f}, predicted {held['predicted']:.4f} "
                f"{band}{inside}, error {held['error_percent']:+.2f}%"
            )
        else:
            print(f"held out {held['run']}: {held['note']}")
    for note in sorted(n for n in notes if n):
        print(note)
    for reason in analysis["skipped"]:
        print(f"skipped: {reason}")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def run_predict(args) -> int:
    """`fitscale sweep predict`: the loss the joint law L(N, D) predicts for a run that was not trained
    (preset + overrides at a budget or step count); ValueError for bad --overrides; exit status 0.
    """
    from fitscale.models.cli import parse_overrides
    from fitscale.sweep.collect import read_results
    from fitscale.sweep.report import fit_law, prepare
    from fitscale.sweep.spec import SweepModel, load_spec, plan_run

    check_bootstrap(args.bootstrap)
    spec = load_spec(args.spec)
    try:
        overrides = parse_overrides(args.overrides)
    except ValueError as error:
        raise UserError(f"--overrides: {error}".replace("--set ", "")) from None
    model = SweepModel("predicted", args.preset, overrides)
    run = plan_run(spec, model, args.budget, args.steps)
    metric, reason, rows, _ = prepare(read_results(spec), args.metric or spec.metric)
    law = fit_law(rows, metric, args.bootstrap)
    if isinstance(law, str):
        raise UserError(f"{spec.name}: cannot predict: {law}")
    predicted = float(law.predict(run.parameters, run.tokens))
    interval = law.interval(run.parameters, run.tokens)
    out = {
        "metric": metric,
        "metric_reason": reason,
        "parameters": run.parameters,
        "steps": run.steps,
        "tokens": run.tokens,
        "training_flops": run.training_flops,
        "predicted": predicted,
        "interval": interval,
        "level": law.level,
        "interval_note": law.interval_note,
        "law": law.to_dict(),
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    band = (
        f"{law.level:.0%} interval [{interval[0]:.4f}, {interval[1]:.4f}]" if interval else law.interval_note
    )
    print(
        f"{args.preset} {' '.join(args.overrides)}: {run.parameters:,} parameters, {run.steps} steps "
        f"({run.tokens:.3g} tokens, {run.training_flops:.3g} FLOPs)"
    )
    print(f"predicted {metric}: {predicted:.4f}, {band}")
    return 0


def check_bootstrap(count: int) -> None:
    """UserError for a negative --bootstrap (0 fits without intervals)."""
    if count < 0:
        raise UserError(f"--bootstrap must be >= 0 (0: fits without intervals), got {count}")
