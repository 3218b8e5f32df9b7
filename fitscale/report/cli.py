"""`fitscale report RUN [RUN...] --out DIR` and `fitscale status RUN [--json]`."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    """Add `fitscale report` and `fitscale status` to `subparsers`."""
    report = subparsers.add_parser(
        "report",
        help="plot and summarise runs from their metrics.jsonl",
        description=(
            "PNG plots (loss, per-timestep loss, learning rate, gradient norm, throughput and MFU against "
            "steps and training FLOPs; several runs overlaid, restarts marked) and a text summary "
            "(best validation loss, throughput medians, time lost to restarts) in --out."
        ),
    )
    report.add_argument("runs", nargs="+", metavar="RUN", help="run folders (train.run_dir)")
    report.add_argument("--out", required=True, help="folder for the PNGs and summary.txt")
    report.add_argument("--json", action="store_true", help="print the summaries as JSON")
    report.set_defaults(func=run_report)
    status = subparsers.add_parser(
        "status",
        help="where a run stands: step, checkpoint, alive, last metrics, ETA, restarts",
    )
    status.add_argument("run", metavar="RUN", help="run folder (train.run_dir)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=run_status_command)


def run_report(args: argparse.Namespace) -> int:
    """`fitscale report`: read every run folder (all checked before anything is written), write the
    plots, summary.txt and summary.json into --out and print the summaries; exit status 0.
    """
    from pathlib import Path

    from fitscale.report.history import format_summary, read_history, summarize
    from fitscale.report.plots import write_plots

    histories = [read_history(run) for run in args.runs]  # every folder checked before anything is written
    names = [h.name for h in histories]
    if len(set(names)) != len(names):
        for history in histories:  # same folder names from different parents: tell them apart
            history.label = str(history.path)
    out = Path(args.out)
    written = write_plots(histories, out)
    summaries = [summarize(h) for h in histories]
    text = "\n".join(format_summary(s) for s in summaries) + "\n"
    (out / "summary.txt").write_text(text)
    (out / "summary.json").write_text(json.dumps(summaries, indent=1))
    if args.json:
        print(json.dumps(summaries, indent=1))
    else:
        print(text + "plots: " + ", ".join(str(p) for p in written))
    return 0


def run_status_command(args: argparse.Namespace) -> int:
    """`fitscale status`: print where a run stands (or JSON); exit status 0."""
    from fitscale.report.status import format_status, run_status

    status = run_status(args.run)
    print(json.dumps(status, indent=1) if args.json else format_status(status))
    return 0
