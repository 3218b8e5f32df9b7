"""`fitscale launch RECIPE --cluster PROFILE ...`: submit a run to SLURM or run it on this machine."""

from __future__ import annotations

import argparse
import json
import sys

EPILOG = """\
examples:
  fitscale launch recipes/demo.yaml --cluster local-slurm --dry-run
  fitscale launch recipes/fitv2_xl_256.yaml --cluster example-cluster --nodes 4 --set train.run_dir=runs/xl
  fitscale launch recipes/demo.yaml --cluster local-slurm --wait        # follow the job to its end
  # two machines without SLURM (run on each, node 0's address as --master-addr):
  fitscale launch RECIPE --cluster local --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `fitscale launch` and its options to `subparsers`."""
    from fitscale.clitools import add_set_option

    parser = subparsers.add_parser(
        "launch",
        help="submit a run to a SLURM cluster (submitit) or run it on this machine",
        description=(
            "Resolve RECIPE for a cluster profile (cluster/<name>.yaml), check that it fits the "
            "topology, and submit it: one task per GPU, requeued on preemption and before the time "
            "limit, logs in <run_dir>/slurm/. Profiles with `scheduler: local` run the ranks here."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="YAML recipe (e.g. recipes/demo.yaml)")
    parser.add_argument(
        "--cluster", help="cluster profile name or YAML path (default: the recipe's launch.cluster)"
    )
    parser.add_argument("--nodes", "--nnodes", dest="nodes", type=int, help="nodes of the job")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (one task each)")
    parser.add_argument(
        "--tasks-per-node",
        "--nproc-per-node",
        dest="tasks_per_node",
        type=int,
        help="processes per node (CPU-only nodes; default one per GPU)",
    )
    parser.add_argument("--time", dest="time_min", type=int, help="time limit of one job in minutes")
    add_set_option(parser, "recipe fields", "train.steps=100 optim.lr=2e-4")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the resources, batch script and resolved config; check the topology; submit nothing",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="follow the SLURM job through requeues to its end; exit 1 and say why if it fails",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    local = parser.add_argument_group("multi-node without SLURM (profiles with scheduler: local)")
    local.add_argument("--node-rank", type=int, default=0, help="this machine's node index, 0..nodes-1")
    local.add_argument("--master-addr", default="127.0.0.1", help="address of node 0")
    local.add_argument("--master-port", type=int, help="port on node 0 (required with more than one node)")
    parser.set_defaults(func=launch_command)


def _print(args: argparse.Namespace, payload: dict, text: str) -> None:
    print(json.dumps(payload, indent=2, default=str) if args.json else text)


def launch_command(args: argparse.Namespace) -> int:
    """`fitscale launch`: resolve the recipe for a cluster profile and submit it to SLURM, run it here
    (`scheduler: local`), or with --dry-run print the plan, sbatch script and resolved config.

    Raises ConfigError for a plan that does not fit the cluster's topology (after printing it with
    --dry-run) or --wait with a local profile; returns the exit status.
    """
    from fitscale.config.errors import ConfigError
    from fitscale.launch.launcher import plan_launch, render_sbatch, run_local, submit_plan

    plan = plan_launch(
        args.recipe,
        args.overrides,
        cluster=args.cluster,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        time_min=args.time_min,
    )
    summary = plan.summary()
    if args.dry_run:
        script = render_sbatch(plan) if plan.profile.scheduler == "slurm" else None
        text = [f"{name}: {value}" for name, value in summary.items() if name != "problems"]
        text += [f"problem: {problem}" for problem in plan.problems] or ["topology: ok"]
        if script:
            text += ["", "# sbatch script", script]
        text += ["", "# resolved config", plan.config_yaml]
        _print(args, {**summary, "sbatch": script, "config": plan.config_yaml}, "\n".join(text))
        if plan.problems:
            raise ConfigError("; ".join(plan.problems))
        return 0
    if plan.profile.scheduler == "local":
        if args.wait:
            raise ConfigError("--wait follows SLURM jobs; a local launch always runs to its end")
        return run_local(
            plan, args.recipe, args.overrides, args.node_rank, args.master_addr, args.master_port
        )
    return _submit(args, plan, submit_plan)


def _submit(args: argparse.Namespace, plan, submit_plan) -> int:
    from fitscale.config.errors import ConfigError
    from fitscale.launch.slurm import SubmissionError, wait_for_job
    from fitscale.runtime import rundir

    try:
        job = submit_plan(plan)
    except SubmissionError as error:
        raise ConfigError(str(error)) from error
    folder = rundir.slurm_folder(plan.run_dir)
    r = plan.resources
    payload = {"job_id": job.job_id, "slurm_folder": str(folder), **plan.summary()}
    if not args.wait:
        _print(
            args,
            payload,
            f"submitted job {job.job_id} to {plan.profile.name}: {r.nodes} node(s) x {r.tasks_per_node} task(s), "
            f"{r.time_min} min per job\n  run folder: {plan.run_dir}\n  logs: {folder}/{job.job_id}_0_log.out "
            f"(.err)\n  follow: squeue -j {job.job_id}; tail -f {folder}/{job.job_id}_0_log.err",
        )
        return 0
    print(
        f"submitted job {job.job_id}; waiting for it to finish (logs in {folder})",
        file=sys.stderr,
        flush=True,
    )
    outcome = wait_for_job(job.job_id, folder)
    payload.update({"state": outcome.state, "reason": outcome.reason, "result": outcome.result})
    if outcome.ok:
        _print(args, payload, f"job {job.job_id} {outcome.state}: {outcome.result}")
        return 0
    if args.json:
        _print(args, payload, "")
    print(
        f"fitscale launch: job {job.job_id} {outcome.state}: {outcome.reason or 'no reason recorded'} "
        f"(logs: {folder}/{job.job_id}_*_log.err)",
        file=sys.stderr,
    )
    return 1
