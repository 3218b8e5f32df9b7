"""`fitscale sweep plan|launch|collect|fit SPEC`: scaling-law sweeps from a YAML spec."""

from __future__ import annotations

import json


def register(subparsers) -> None:
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
        "fit", help="L(C) = a C^-b + c per size and frontier, isoFLOP optima, PNG plots"
    )
    fit.add_argument("spec")
    fit.add_argument(
        "--metric", default="val_loss_ema", help="val_loss_ema (default), val_loss, train_loss or fid"
    )
    fit.add_argument("--json", action="store_true")
    fit.set_defaults(func=run_fit)


def run_plan(args) -> int:
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
    from fitscale.sweep.launch import launch_sweep
    from fitscale.sweep.spec import load_spec

    outcome = launch_sweep(load_spec(args.spec), args.cluster, args.local, args.only or None)
    print(json.dumps(outcome, indent=1) if args.json else "\n".join(f"{k}: {v}" for k, v in outcome.items()))
    return 0


def run_collect(args) -> int:
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


def run_fit(args) -> int:
    from fitscale.sweep.collect import read_results
    from fitscale.sweep.report import analyse, write_report
    from fitscale.sweep.spec import load_spec

    spec = load_spec(args.spec)
    rows = read_results(spec)
    files = write_report(rows, spec.out_dir, args.metric)
    analysis = analyse(rows, args.metric)
    if args.json:
        print(json.dumps({**analysis, "files": [str(f) for f in files]}, indent=1))
        return 0
    for model, fit in analysis["per_model"].items():
        lo, hi = fit["b_interval"]
        print(f"{model}: L = {fit['a']:.4g} C^-{fit['b']:.4f} + {fit['c']:.4f}  (b in [{lo:.3f}, {hi:.3f}])")
    if "frontier" in analysis:
        fit = analysis["frontier"]
        print(f"frontier: L = {fit['a']:.4g} C^-{fit['b']:.4f} + {fit['c']:.4f}")
    if "optimal_size" in analysis:
        fit = analysis["optimal_size"]
        print(
            f"compute-optimal size: N* = {fit['k']:.4g} C^{fit['alpha']:.3f} (alpha in "
            f"[{fit['alpha_interval'][0]:.3f}, {fit['alpha_interval'][1]:.3f}])"
        )
    for reason in analysis["skipped"]:
        print(f"skipped: {reason}")
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
