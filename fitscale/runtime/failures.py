"""One error line for a multi-process run: the first failing rank's, reported once by the launcher.

Without this, a run of N ranks that fails prints N copies of the error (one per rank, each
after its own traceback) followed by the launcher's report. Here the ranks a launcher starts
get `FITSCALE_ERROR_DIR` in their environment; a rank whose command fails writes its one-line
message, exit status and traceback to `<dir>/rank-R.json` (`record_failure`) and prints
nothing. The launcher keeps the output of every rank but its node's first in
`<run_dir>/logs/rank-R.log` (appended to), and once the ranks have stopped it reads the
reports (`first_failure`): a rank killed by a signal (out of memory, a crash) cannot write one, so
the launcher writes it (`record_stopped_rank`: `rank 1 was killed by SIGKILL (signal 9)` and a
hint), and that rank is the cause ahead of its peers' connection errors; otherwise the report
written first is the cause (the others are ranks that lost their peer in a collective, or were
stopped), errors that blame a lost peer coming last. It becomes the launcher's own error line and
exit status (`WorkerFailed`), exactly as the single-process run reports it: status 2 and the
message for a configuration error, status 1 and `Type: message` for any other exception.
With `FITSCALE_DEBUG=1` the report carries the rank's traceback, and the launcher prints that.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from fitscale.runtime.local import INTERRUPTED_STATUS, launch_local, signal_name
from fitscale.runtime.rundir import slurm_folder

ERROR_DIR_ENV = "FITSCALE_ERROR_DIR"
LAST_ERROR = "logs/last-error.json"  # in the run folder: the report a local launch ended with


class WorkerFailed(Exception):
    """A rank of a launched run failed; `str()` is its one-line message, `code` the exit status."""

    def __init__(self, message: str, code: int, details: str | None = None):
        super().__init__(message)
        self.code = code
        self.details = details  # the rank's traceback, shown with FITSCALE_DEBUG=1


def error_line(error: BaseException, user_error: bool) -> str:
    """The one line a failure prints: a user error's message, `Type: message` for any other."""
    text = str(error).strip().splitlines()
    message = text[0] if text else ""
    if user_error:
        return message
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def in_launched_rank() -> bool:
    """Whether this process is a rank started by fitscale's launcher (it reports errors through a file)."""
    return ERROR_DIR_ENV in os.environ


def record_failure(error: BaseException, user_error: bool, folder: str | Path | None = None) -> None:
    """Write this rank's report into `folder` (default: `FITSCALE_ERROR_DIR`, set by the launcher).

    `user_error`: a configuration or input error (status 2, its message alone), else status 1.
    """
    folder = Path(folder if folder is not None else os.environ[ERROR_DIR_ENV])
    folder.mkdir(parents=True, exist_ok=True)
    rank = os.environ.get("RANK", "0")
    report = {
        "rank": int(rank),
        "time": time.time(),
        "code": 2 if user_error else 1,
        "message": error_line(error, user_error),
        "traceback": "".join(traceback.format_exception(error)),
    }
    partial = folder / f".rank-{rank}.json.tmp"
    partial.write_text(json.dumps(report))
    partial.replace(folder / f"rank-{rank}.json")  # whole or absent, never half a report


# A rank's error that blames a peer: the consequence of another rank's death, never the cause.
PEER_LOST = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
    "ECONNRESET",
    "EPIPE",
)
SIGNAL_HINTS = {
    "SIGKILL": "out of memory? the kernel's OOM killer sends SIGKILL: check `dmesg` (or `journalctl -k`)",
    "SIGSEGV": "a crash in native code (torch, a kernel or an extension); check `dmesg` and the log",
    "SIGBUS": "a crash in native code or a full /dev/shm; check `dmesg` and the log",
    "SIGABRT": "native code aborted (an assertion in torch or a library); see the log",
    "SIGTERM": "stopped from outside fitscale (the scheduler, a user or a script)",
    "SIGINT": "interrupted",
    "SIGHUP": "its terminal went away",
}


def record_stopped_rank(folder: str | Path, rank: int, code: int, log: str | Path | None) -> None:
    """The launcher's report for rank `rank`, which stopped with exit `code` (negative: killed by
    that signal) and wrote no report of its own; its output is in `log` (None: the terminal).

    A rank killed by a signal could not report, so the launcher does: `rank 1 was killed by SIGKILL
    (signal 9) (out of memory? ... check `dmesg` ...); its output is in RUN/logs/rank-1.log`, exit
    status 128 + signal, as a shell reports it. A report the rank wrote itself is kept as it is;
    a rank that exited with INTERRUPTED_STATUS (Ctrl-C, after saving or saying what is lost) gets
    none, so `fitscale status` shows no error for a stop the user asked for.
    """
    folder = Path(folder)
    if (folder / f"rank-{rank}.json").exists():
        return
    if code == INTERRUPTED_STATUS:  # Ctrl-C: the rank said what it saved or lost; no error of the run
        return
    where = f"its output is in {log}" if log is not None else "its output is above"
    if code < 0:
        name = signal_name(-code)
        hint = SIGNAL_HINTS.get(name.split(" ")[0])
        message = f"rank {rank} was killed by {name}{f' ({hint})' if hint else ''}; {where}"
        status, cause = 128 - code, "signal"
    else:
        message = f"rank {rank} exited with status {code} without an error report; {where}"
        status, cause = code, "exit"
    report = {"rank": rank, "time": time.time(), "code": status, "message": message, "traceback": "",
              "stopped_by": cause}  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".rank-{rank}.json.tmp"
    partial.write_text(json.dumps(report))
    partial.replace(folder / f"rank-{rank}.json")


def _blame_order(report: dict) -> tuple[int, float, int]:
    """Which report names the cause: a rank killed by a signal (its peers then lose their
    connections), a rank's own error, a rank that exited without a report, and last an error that
    blames a lost peer; within each, the one written first (ties: the lowest rank)."""
    stopped_by = report.get("stopped_by")
    if stopped_by == "signal":
        kind = 0
    elif stopped_by == "exit":
        kind = 2
    else:
        kind = 3 if any(marker in report["message"] for marker in PEER_LOST) else 1
    return kind, report["time"], report["rank"]


def first_failure(folder: str | Path) -> dict | None:
    """The report that names the cause in `folder` (see `_blame_order`), or None when there is none."""
    reports = [json.loads(path.read_text()) for path in Path(folder).glob("rank-*.json")]
    return min(reports, key=_blame_order) if reports else None


def slurm_error_folder(slurm_folder: str | Path, job_id: str, restart: int | str) -> Path:
    """Where the tasks of one attempt of a SLURM job write their reports (a requeue starts a new one)."""
    return Path(slurm_folder) / "errors" / f"{job_id}-{restart}"


def slurm_first_failure(slurm_folder: str | Path, job_id: str) -> dict | None:
    """The first failing rank's report of a SLURM job's latest attempt, or None."""
    attempts = list((Path(slurm_folder) / "errors").glob(f"{job_id}-*"))
    numbered = [(int(a.name.rsplit("-", 1)[1]), a) for a in attempts if a.name.rsplit("-", 1)[1].isdigit()]
    return first_failure(max(numbered)[1]) if numbered else None


def last_failure(run_dir: str | Path) -> dict | None:
    """The newest failure report of a run (its last local launch's, or a SLURM attempt's), or None."""

    run_dir = Path(run_dir)
    reports = [first_failure(folder) for folder in (slurm_folder(run_dir) / "errors").glob("*-*")]
    local = run_dir / LAST_ERROR
    if local.is_file():
        reports.append(json.loads(local.read_text()))
    reports = [r for r in reports if r is not None]
    return max(reports, key=lambda r: r["time"]) if reports else None


def launch_failure(folder: str | Path, code: int) -> WorkerFailed:
    """The error the launcher raises for ranks that stopped with status `code` (non-zero)."""
    report = first_failure(folder)
    if report is not None:
        return WorkerFailed(report["message"], int(report["code"]), report["traceback"])
    if code < 0:  # killed by a signal before it could report (out of memory, SIGKILL, a crash)
        return WorkerFailed(f"a rank was killed by signal {-code}; see its log in the run folder", 128 - code)
    return WorkerFailed(f"a rank exited with status {code} without an error report", code)


def run_ranks(command: list[str], nproc_per_node: int, run_dir: str | Path, **launch: object) -> None:
    """`launch_local(command, nproc_per_node, **launch)` with one error line: returns when every rank
    succeeded, raises the first failing rank's `WorkerFailed` otherwise. The other ranks' output
    goes to `<run_dir>/logs/`."""
    import tempfile

    env = dict(launch.pop("env", None) or {})  # type: ignore[call-overload]
    with tempfile.TemporaryDirectory(prefix="fitscale-errors-") as folder:
        code = launch_local(
            command,
            nproc_per_node,
            env={**env, ERROR_DIR_ENV: folder},
            log_dir=Path(run_dir) / "logs",
            on_stopped_rank=lambda rank, code, log: record_stopped_rank(folder, rank, code, log),
            **launch,  # type: ignore[arg-type]
        )
        if code != 0:
            failure = launch_failure(folder, code)
            report = first_failure(folder)
            if report is not None:  # for `fitscale status`
                (Path(run_dir) / LAST_ERROR).write_text(json.dumps(report))
            raise failure
