"""File reads that decide what a collective does, made the same decision on every rank.

On a shared file system (NFS, Lustre) ranks can see different answers to the same question at the
same moment: whether `step-N/fitscale.json` exists, what it says, whether a dataset file is
readable. Ranks that decide differently then call different collectives, and the run hangs until
the process-group timeout (a public PyTorch report: a deadlock from exactly this). Two rules:

- `rank0_decides(read)`: rank 0 reads and every rank gets its answer (`broadcast_object_list`);
  an exception raised by the read on rank 0 is raised on every rank, same type and message.
  For small answers: which checkpoints exist, their metadata, the lock.
- `all_ranks_agree(read)`: every rank reads (the answer is too large to broadcast, or every rank
  needs its own copy), then the ranks compare outcomes (`all_gather_object`): if the read failed
  anywhere, every rank raises the first failing rank's error, naming that rank.

Either way no rank is left waiting in a collective that the others never reach. Without an
initialised process group (one process) both just run the read.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

from fitscale.errors import UserError

T = TypeVar("T")


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _portable(error: BaseException, prefix: str = "") -> BaseException:
    """`error` (its message prefixed) if it survives pickling, else a RuntimeError with its text."""
    message = f"{prefix}{error}"
    try:
        copy = type(error)(message) if prefix else error
        pickle.loads(pickle.dumps(copy))
        return copy
    except Exception:
        return RuntimeError(f"{prefix}{type(error).__name__}: {error}")


def rank0_decides(read: Callable[[], T], group=None) -> T:
    """`read()` on rank 0 of `group`; its result, or its exception, on every rank (collective)."""
    if not _distributed(group):
        return read()
    box: list[Any] = [None]
    if dist.get_rank(group) == 0:
        try:
            box[0] = ("ok", read())
        except Exception as error:
            box[0] = ("error", _portable(error))
    source = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(box, src=source, group=group)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def all_ranks_agree(read: Callable[[], T], group=None) -> T:
    """`read()` on every rank; if it raised on any rank, the first such error on every rank (collective)."""
    if not _distributed(group):
        return read()
    try:
        result, failure = read(), None
    except Exception as error:
        result, failure = None, error
    rank = dist.get_rank()
    outcomes: list[Any] = [None] * dist.get_world_size(group)
    mine = None if failure is None else _portable(failure, prefix=f"rank {rank}: ")
    dist.all_gather_object(outcomes, mine, group=group)
    first = next((outcome for outcome in outcomes if outcome is not None), None)
    if first is not None:
        if failure is not None and first is mine:
            raise first from failure
        raise first
    return result  # type: ignore[return-value]


def same_on_all_ranks(value: Any, what: str, group=None) -> None:
    """Raise the same ValueError on every rank unless every rank holds an equal `value` (collective).

    For what each rank read for itself and must agree on (the dataset's identity): `what` names it.
    """
    if not _distributed(group):
        return
    values: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    differ = [rank for rank, other in enumerate(values) if other != values[0]]
    if differ:
        raise UserError(
            f"ranks see different {what}: rank 0 {values[0]!r}, rank {differ[0]} {values[differ[0]]!r} "
            "(a shared file system that has not caught up, or a file rewritten during start-up); "
            "make the files identical for every node and restart"
        )
