"""Exclusive locks on folders that die with their holder: `flock` on a file inside the folder.

The kernel drops an `flock` when its holder exits, even by SIGKILL, so a dead holder's lock is
taken over without cleanup while a live one is refused. The file names its holder for the error
message. Used for run folders (fitscale/train/state.py) and Streaming cache folders
(fitscale/data/cache.py).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


def try_lock(path: Path, holder: str) -> tuple[int | None, str]:
    """(file descriptor holding the lock, "") or (None, what the live holder wrote in the file).

    On success `holder` is written into the file; keep the descriptor open to keep the lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        written = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        return None, written
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    os.fsync(fd)
    return fd, ""


def wait_lock(path: Path) -> int:
    """Descriptor holding an exclusive `flock` on `path`, waiting for a live holder to let go (or
    exit): for a short critical section that every process must pass through once, such as the
    merge of a split dataset write. Close the descriptor to release it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd
