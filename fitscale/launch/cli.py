"""`fitscale launch RECIPE --cluster PROFILE ...`: submit a run to SLURM or run it on this machine;
`fitscale launch --cluster PROFILE ... --command -- ARGS...`: submit any other fitscale command as a
SLURM job (fitscale.launch.command)."""

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
  # any other fitscale command as a SLURM job, once per task (everything after `--command --`):
  fitscale launch --cluster local-slurm --tasks-per-node 2 --log-dir runs/encode --command -- data from-images IMAGES OUT --vae VAE
  fitscale launch --cluster example-cluster --nodes 2 --wait --command -- eval samples/ --ref ref.npz
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
    parser.add_argument(
        "recipe", nargs="?", help="YAML recipe (e.g. recipes/demo.yaml); omitted with --command"
    )
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
    command = parser.add_argument_group("any fitscale command as a SLURM job (instead of RECIPE)")
    command.add_argument(
        "--command",
        dest="submit_command",
        action="store_true",
        help="submit `fitscale ARGS...` once per task instead of a recipe: write the command after `--` "
        "at the end (-- data from-images ... or -- eval ...); needs --cluster with a SLURM profile",
    )
    command.add_argument("command_args", nargs="*", metavar="ARGS", help=argparse.SUPPRESS)
    command.add_argument(
        "--log-dir",
        default="runs/commands",
        help="with --command: the job's logs go to LOG_DIR/slurm/ (default runs/commands)",
    )
    command.add_argument("--job-name", help="with --command: SLURM job name (default fitscale-<command>)")
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

    if args.submit_command or args.recipe is None or args.command_args:
        return command_launch(args)
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


def _submitted(submit, plan):
    """`submit(plan)`'s submitit Job; sbatch's refusal as a one-line ConfigError."""
    from fitscale.config.errors import ConfigError
    from fitscale.launch.slurm import SubmissionError

    try:
        return submit(plan)
    except SubmissionError as error:
        raise ConfigError(str(error)) from error


def _waited(job, folder):
    """Say where the logs are, then follow the job to its end (fitscale.launch.slurm.wait_for_job)."""
    from fitscale.launch.slurm import wait_for_job

    print(
        f"submitted job {job.job_id}; waiting for it to finish (logs in {folder})",
        file=sys.stderr,
        flush=True,
    )
    return wait_for_job(job.job_id, folder)


def _submit(args: argparse.Namespace, plan, submit_plan) -> int:
    from fitscale.runtime import rundir

    job = _submitted(submit_plan, plan)
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
    outcome = _waited(job, folder)
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


def command_launch(args: argparse.Namespace) -> int:
    """`fitscale launch --command -- ARGS`: submit `fitscale ARGS` to SLURM once per task, or with
    --dry-run print the plan and batch script. UserError (one line) without a command, for `launch`
    or `train` (their recipe form), with a RECIPE as well, without --cluster or with a profile
    without SLURM; returns the exit status (with --wait: 1 unless every task ended well)."""
    from fitscale.errors import UserError
    from fitscale.launch.command import plan_command, render_command_sbatch, submit_command

    if not args.submit_command:
        raise UserError(
            "give one RECIPE, or --command -- ARGS to submit another fitscale command"
            + (f" (got extra arguments {' '.join(args.command_args)!r})" if args.command_args else "")
        )
    # after `--`, argparse fills RECIPE with the command's first word
    argv = [] if args.recipe is None else [args.recipe, *args.command_args]
    if args.cluster is None:
        raise UserError(
            "--command: --cluster PROFILE is required (a SLURM profile, e.g. --cluster local-slurm)"
        )
    if args.overrides:
        raise UserError("--command: --set applies to recipes only; pass the command's own options after --")
    plan = plan_command(
        argv,
        args.cluster,
        args.log_dir,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        time_min=args.time_min,
        job_name=args.job_name,
    )
    summary = plan.summary()
    if args.dry_run:
        script = render_command_sbatch(plan)
        text = [f"{name}: {value}" for name, value in summary.items()]
        text += ["task command: " + " ".join(plan.task_command()), "", "# sbatch script", script]
        _print(args, {**summary, "task_command": plan.task_command(), "sbatch": script}, "\n".join(text))
        return 0
    return _submit_command(args, plan, submit_command)


def _submit_command(args: argparse.Namespace, plan, submit_command) -> int:
    from fitscale.launch.command import task_statuses

    job = _submitted(submit_command, plan)
    folder, tasks = plan.slurm_folder, plan.resources.world_size
    payload = {"job_id": job.job_id, "slurm_folder": str(folder), **plan.summary()}
    logs = f"{folder}/{job.job_id}_<task>_log.out (.err)"
    if not args.wait:
        _print(
            args,
            payload,
            f"submitted job {job.job_id} to {plan.profile.name}: {summary_line(plan)}\n  logs: {logs}",
        )
        return 0
    outcome = _waited(job, folder)
    statuses = task_statuses(folder, job.job_id, tasks)
    ok = outcome.state == "COMPLETED" and all(task["status"] == "ok" for task in statuses)
    payload.update({"state": outcome.state, "tasks": statuses})
    lines = [f"job {job.job_id} {outcome.state}: {summary_line(plan)}"]
    lines += [
        f"  task {t['task']}: {t['status']}" + (f" ({t['detail']})" if t["detail"] else "") for t in statuses
    ]
    if not ok:
        lines.append(f"  logs: {logs}")
    _print(args, payload, "\n".join(lines))
    return 0 if ok else 1


def summary_line(plan) -> str:
    """`fitscale ARGS` on N node(s) x T task(s)."""
    r = plan.resources
    return f"{plan.summary()['command']} on {r.nodes} node(s) x {r.tasks_per_node} task(s)"
