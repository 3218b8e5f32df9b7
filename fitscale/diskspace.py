"""A full disk or quota as one line: the path, the bytes needed when known, the free bytes, the fix.

A write that runs out of space fails in several shapes: `OSError` with errno ENOSPC or EDQUOT,
the same chained under another exception, DCP's `CheckpointException` (a `BaseException`) holding
each rank's failure, or torch's zip writer `RuntimeError: [enforce fail at inline_container.cc:672]
. unexpected pos 704 vs 598`, which has lost the errno on the way. `is_out_of_space` recognises
them all: by errno where there is one, and for a write failure without errno by the free space
of the target (less than the bytes the write needed, or under `LOW_SPACE_BYTES`).

`OutOfSpaceError` carries the one line (`str()`), e.g. `no space left on the filesystem of
RUN/metrics.jsonl for the metrics log (12.0 KiB free); free space there, or point train.run_dir at
a larger filesystem`. The command line prints it without a traceback (fitscale/cli.py), and a
launched rank's report carries it to the launcher (fitscale/runtime/failures.py).

This module sits at the bottom of the package (no fitscale imports), so every layer that writes
(checkpoints, metrics, datasets) can name its own path and fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# A write failure that lost its errno counts as a full disk when the target has less free space
# than this (or than the write needed, when that is known).
LOW_SPACE_BYTES = 1 << 20
# Messages of write failures that carry no errno (torch.save's zip writer on a short write).
_ERRNO_LOST = ("inline_container", "PytorchStreamWriter failed writing", "unexpected pos")
# An errno kept only in the message, as Rust's io::Error prints it (safetensors' SafetensorError:
# `I/O error: No space left on device (os error 28)`).
_ERRNO_IN_MESSAGE = re.compile(r"\(os error (\d+)\)")


class OutOfSpaceError(OSError):
    """The filesystem holding `path` is full (or the user's quota there is spent); `str()` is the
    one-line report, `needed` the bytes the failed write needed (None when unknown)."""

    def __init__(self, message: str, path: str | os.PathLike, needed: int | None = None):
        super().__init__(message)
        self.path = Path(path)
        self.needed = needed


def human_bytes(count: int | float) -> str:
    """`count` bytes as `512 B`, `12.0 KiB`, `10.4 MiB`, `3.2 GiB` (powers of 1024)."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes free to this user on the filesystem of `path` (or of its nearest existing parent);
    None when nothing along the path can be looked at."""
    candidate = Path(path).absolute()
    for folder in (candidate, *candidate.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, its chained causes and contexts, and the per-rank failures DCP wraps, each once."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)  # DCP's CheckpointException: {rank: (error, trace)}
        if isinstance(failures, dict):
            pending += [pair[0] for pair in failures.values() if isinstance(pair, tuple) and pair]


def is_out_of_space(
    error: BaseException, target: str | os.PathLike | None = None, needed: int | None = None
) -> bool:
    """Whether `error` (or anything it wraps) is a full disk or spent quota.

    ENOSPC/EDQUOT anywhere in the chain decide it, also when only its message keeps the number
    (`(os error 28)`, from libraries written in Rust). A write failure without errno (torch's zip
    writer) counts when `target` is given and its filesystem has less free space than `needed`
    bytes or `LOW_SPACE_BYTES`.
    """
    lost_errno = False
    for cause in _causes(error):
        if isinstance(cause, OutOfSpaceError):
            return True
        if isinstance(cause, OSError) and cause.errno in NO_SPACE_ERRNOS:
            return True
        if any(int(number) in NO_SPACE_ERRNOS for number in _ERRNO_IN_MESSAGE.findall(str(cause))):
            return True
        lost_errno |= any(marker in str(cause) for marker in _ERRNO_LOST)
    if not lost_errno or target is None:
        return False
    free = free_bytes(target)
    return free is not None and free < max(LOW_SPACE_BYTES, needed or 0)


def is_quota(error: BaseException | None) -> bool:
    """Whether `error` (or anything it wraps) is a spent disk quota (EDQUOT), not a full filesystem."""
    if error is None:
        return False
    for cause in _causes(error):
        if isinstance(cause, OSError) and cause.errno == errno.EDQUOT:
            return True
        if str(errno.EDQUOT) in _ERRNO_IN_MESSAGE.findall(str(cause)):
            return True
    return False


def out_of_space(
    path: str | os.PathLike,
    what: str,
    fix: str,
    needed: int | None = None,
    error: BaseException | None = None,
) -> OutOfSpaceError:
    """The error for a write of `what` to `path` that ran out of space; `fix` says what to do.

    With the failure `error` a spent quota (EDQUOT) says so: the filesystem's free bytes are then
    not the user's, and "no space left" with gigabytes free would mislead.
    """
    free = free_bytes(path)
    sizes = [f"it needs about {human_bytes(needed)}"] if needed else []
    if is_quota(error):
        if free is not None:
            sizes.append(f"the filesystem has {human_bytes(free)} free, but not for you")
        detail = f" ({', '.join(sizes)})" if sizes else ""
        return OutOfSpaceError(
            f"disk quota exceeded on the filesystem of {path} for {what}{detail}; your quota there is spent "
            f"(see `quota -s`, or `lfs quota -u $USER` on Lustre): free space you own there, ask for a larger "
            f"quota, or {fix[0].lower()}{fix[1:]}",
            path,
            needed,
        )
    if free is not None:
        sizes.append(f"{human_bytes(free)} free")
    detail = f" ({', '.join(sizes)})" if sizes else ""
    return OutOfSpaceError(
        f"no space left on the filesystem of {path} for {what}{detail}; {fix}", path, needed
    )


def describe(error: BaseException) -> OutOfSpaceError | None:
    """An `OutOfSpaceError` for any full-disk error that names no fix of its own (the path from the
    error's filename when it has one), the error itself when it already is one, else None."""
    if not is_out_of_space(error):
        return None
    for cause in _causes(error):
        if isinstance(cause, OutOfSpaceError):
            return cause
    named = [c for c in _causes(error) if isinstance(c, OSError) and c.filename]
    if named:
        return out_of_space(
            named[0].filename, "this write", "free space there or write to another filesystem", error=error
        )
    return OutOfSpaceError(
        f"no space left on device ({str(error).splitlines()[0] if str(error) else type(error).__name__}); "
        "free space on the filesystem this command writes to, or write elsewhere",
        ".",
    )


@contextlib.contextmanager
def named_out_of_space(path: str | os.PathLike, what: str, fix: str, needed: int | None = None):
    """Turn a full-disk failure inside the block into `out_of_space(path, what, fix, needed)`
    (chained to the original); other errors pass through unchanged."""
    try:
        yield
    except (OutOfSpaceError, KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as error:  # DCP's CheckpointException is a BaseException
        if is_out_of_space(error, path, needed):
            raise out_of_space(path, what, fix, needed, error) from error
        raise


class CheckedAppendFile:
    """A text file opened for appending whose writes name the file and the fix on a full disk.

    Unbuffered underneath: each `write` goes to the kernel at once, so nothing is left in a buffer
    that a later `close` would fail to flush (a second, anonymous ENOSPC).
    """

    def __init__(self, path: str | os.PathLike, what: str, fix: str):
        self.path, self.what, self.fix = Path(path), what, fix
        with named_out_of_space(self.path, what, fix):
            self._file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (closed by close())

    def write(self, text: str) -> int:
        """Append `text` (UTF-8); raises OutOfSpaceError naming the file on a full disk."""
        data = text.encode()
        with named_out_of_space(self.path, self.what, self.fix):
            view = memoryview(data)
            while view:
                view = view[self._file.write(view) :]
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered here; kept for the file interface."""

    def fileno(self) -> int:
        """The descriptor of the open file (for `os.fsync`)."""
        return self._file.fileno()

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._file.closed

    def close(self) -> None:
        """Close the file (idempotent)."""
        self._file.close()
