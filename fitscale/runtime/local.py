"""Run a command as N ranks on this machine, and as one node of a multi-node job without SLURM.

`launch_local` starts `nproc_per_node` processes of the same command with the `env://`
rendezvous variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
GROUP_RANK, MASTER_ADDR, MASTER_PORT), so the command joins the process group exactly as under
torchrun. For clusters without SLURM, run it once per node with the same `nnodes`,
`master_addr` and `master_port` and that node's `node_rank` (torchrun's static rendezvous).

Why not torchrun itself: torchrun forwards SIGTERM/SIGINT to its workers but dies on SIGUSR1 and
SIGUSR2 (their default action), orphaning the workers; the trainer checkpoints on those signals.
Here every one of SIGTERM, SIGINT, SIGUSR1, SIGUSR2 reaches every rank, and when one rank fails
the others are stopped (they would otherwise wait in a collective until the timeout).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fitscale.errors import UserError

FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

# The exit status of a run stopped by Ctrl-C (128 + SIGINT, as a shell reports it): after the checkpoint
# the first SIGINT asks for, at the second SIGINT, or during start-up. The one definition that the
# checkpoint manager, the launcher and the command line share (fitscale.config.checkpoint re-exports it).
INTERRUPTED_STATUS = 128 + signal.SIGINT


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the rendezvous binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def python_module_command(module: str, *args: str) -> list[str]:
    """`python -m module args...` with this interpreter (what each rank runs)."""
    return [sys.executable, "-m", module, *args]


def rank_environments(
    nproc_per_node: int, nnodes: int, node_rank: int, master_addr: str, master_port: int
) -> list[dict[str, str]]:
    """The torch.distributed variables of each local rank of this node."""
    world_size = nproc_per_node * nnodes
    return [
        {
            "RANK": str(node_rank * nproc_per_node + local_rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(nproc_per_node),
            "GROUP_RANK": str(node_rank),
            "NODE_RANK": str(node_rank),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
            # Ranks print as they go; a buffered rank that gets killed would lose its last lines.
            "PYTHONUNBUFFERED": "1",
        }
        for local_rank in range(nproc_per_node)
    ]


def launch_local(
    command: Sequence[str],
    nproc_per_node: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
    env: Mapping[str, str] | None = None,
    stop_grace_s: float = 60.0,
    log_dir: str | Path | None = None,
    on_stopped_rank: Callable[[int, int, Path | None], None] | None = None,
) -> int:
    """Run `command` in `nproc_per_node` processes of one node of an `nnodes`-node job; return its exit code.

    How `fitscale train --nproc N` uses it: build the argv that makes one rank train, e.g.
    `python_module_command("fitscale.train.cli", "train", recipe, "--set", ...)`, and call
    `launch_local(argv, N)`. Each rank finds its place with `fitscale.runtime.env.init_distributed_from_env()`
    (or any `env://` rendezvous). Multi-node without SLURM: run the same call on every node with
    `nnodes`, that node's `node_rank`, the address of node 0 as `master_addr` and one agreed `master_port`.

    Returns 0 when every rank exits 0. When a rank fails, the other ranks get SIGTERM (then SIGKILL
    after `stop_grace_s`) and the failed rank's code is returned. Signals to this process
    (SIGTERM, SIGINT, SIGUSR1, SIGUSR2) are forwarded to every rank and do not stop this function;
    it returns when the ranks have exited (called from another thread, signals are not forwarded).
    `env` adds variables to every rank's environment. With `log_dir`, every rank but this node's
    first writes its output to `log_dir/rank-R.log` (appended to) instead of the terminal, and the
    launcher prints nothing of its own (see fitscale.runtime.failures for the error line).

    The failing rank is the first one seen stopped: one killed by a signal before any other (its
    peers then fail with connection errors), else the lowest. `on_stopped_rank(rank, code, log)` is
    called for each rank that failed (`log`: its log file, None for the terminal's); run through
    fitscale.runtime.failures.run_ranks it writes the report of a rank that could not write its own
    (killed by a signal, or exited without one), e.g. `rank 1 was killed by SIGKILL (signal 9)`.
    """
    if nproc_per_node < 1:
        raise UserError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UserError(f"node_rank must be in [0, nnodes={nnodes}), got {node_rank}")
    if master_port is None:
        if nnodes > 1:
            raise UserError("a multi-node launch needs an explicit master_port that every node agrees on")
        master_port = free_port(master_addr)
    base_env = {**os.environ, **(env or {})}
    processes: list[subprocess.Popen] = []
    previous_handlers = {}

    def forward(signum, _frame):
        for process in processes:
            if process.poll() is None:
                process.send_signal(signum)

    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        for signum in FORWARDED_SIGNALS:
            previous_handlers[signum] = signal.signal(signum, forward)
    try:
        for rank_env in rank_environments(nproc_per_node, nnodes, node_rank, master_addr, master_port):
            output = _rank_log(log_dir, rank_env)
            processes.append(
                subprocess.Popen(
                    list(command),
                    env={**base_env, **rank_env},
                    stdout=output,
                    stderr=subprocess.STDOUT if output is not None else None,
                    # Own session: a Ctrl-C in the terminal reaches each rank once (forwarded), not twice.
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            )
            if output is not None:
                output.close()  # the rank holds its own copy
        first_rank = node_rank * nproc_per_node
        failed = _wait_for_ranks(processes, first_rank, stop_grace_s, quiet=log_dir is not None)
        if on_stopped_rank is not None:
            for rank, code in failed:
                is_first = rank == first_rank  # its output went to the terminal, the others' to log_dir
                log = None if log_dir is None or is_first else Path(log_dir) / f"rank-{rank}.log"
                on_stopped_rank(rank, code, log)
        return failed[0][1] if failed else 0
    finally:
        _stop(processes, stop_grace_s)
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


def _rank_log(log_dir: str | Path | None, rank_env: Mapping[str, str]):
    """The open log file of a rank whose output stays off the terminal, else None."""
    if log_dir is None or rank_env["LOCAL_RANK"] == "0":
        return None
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    return open(Path(log_dir) / f"rank-{rank_env['RANK']}.log", "ab")


def _die_with_parent() -> None:
    """Linux: the rank gets SIGTERM if the launcher dies (even by SIGKILL), so no rank is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _wait_for_ranks(
    processes: list[subprocess.Popen], first_rank: int, stop_grace_s: float, quiet: bool = False
) -> list[tuple[int, int]]:
    """Wait for all ranks; on the first failure stop the rest. Returns the (rank, exit code) of the
    ranks seen failed at that moment, the cause first (killed by a signal, then the lowest rank;
    a negative code is the signal's number), or [] when every rank exited 0."""
    while True:
        codes = [process.poll() for process in processes]
        failed = [(first_rank + index, code) for index, code in enumerate(codes) if code not in (None, 0)]
        if failed:
            failed.sort(key=lambda item: (item[1] >= 0, item[0]))  # a rank killed by a signal went first
            rank, code = failed[0]
            if any(c is None for c in codes) and not quiet:
                how = f"was killed by {signal_name(-code)}" if code < 0 else f"exited with code {code}"
                print(
                    f"fitscale launch: rank {rank} {how}; stopping the other ranks",
                    file=sys.stderr,
                    flush=True,
                )
            _stop(processes, stop_grace_s)
            return failed
        if all(code == 0 for code in codes):
            return []
        time.sleep(0.1)


def signal_name(signum: int) -> str:
    """`SIGKILL (signal 9)` for 9; `signal 64` for a number with no name here."""
    try:
        return f"{signal.Signals(signum).name} (signal {signum})"
    except ValueError:
        return f"signal {signum}"


def _stop(processes: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM the ranks still running (the trainer checkpoints on it), SIGKILL after the grace period."""
    running = [p for p in processes if p.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in running:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
