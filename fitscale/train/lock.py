"""The run-folder lock: one live run per `train.run_dir`, and who holds it (`fitscale status`).

Imports no torch, so `fitscale status` answers at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from fitscale.locking import try_lock


class RunFolderInUseError(FileExistsError):
    """Another live process holds the run folder (a FileExistsError, so the CLI reports it in one line)."""


class RunLock:
    """An exclusive lock on the run folder, held by rank 0 for the whole run.

    Built on `flock`, which the kernel drops when its holder dies (even by SIGKILL), so the lock
    of a dead run is taken over without any cleanup, while a second live run is refused. The
    file names the holder for the error message.
    """

    FILE_NAME = ".lock"

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / self.FILE_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the run folder's lock, recording pid, host and time; RunFolderInUseError naming the live
        holder.
        """
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        fd, holder = try_lock(self.path, json.dumps(info))
        if fd is None:
            raise RunFolderInUseError(
                f"run folder {str(self.path.parent)!r} is in use by a live run ({holder or 'unknown process'}); "
                "stop that run or choose another train.run_dir"
            )
        self._fd = fd

    def release(self) -> None:
        """Release the lock if held (also released by the OS when the process dies)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> dict[str, Any] | None:
        """Who took the lock last ({"pid", "host", "since"}), or None when no run ever took it.

        The file is not cleared on release: whether that holder is still alive is `held()`."""
        try:
            return json.loads(self.path.read_text() or "null")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def held(self) -> bool | None:
        """Whether a live process holds the lock, checked without touching it (taking it, even for a
        moment, could refuse a run starting then): the kernel's table of flock locks (/proc/locks)
        when the holder ran on this host; None (unknown) when it ran on another host."""
        holder = self.holder()
        if holder is None:
            return False
        if holder.get("host") != socket.gethostname():
            return None
        try:
            inode = os.stat(self.path).st_ino
            table = Path("/proc/locks").read_text()
        except OSError:
            try:  # no lock table: the holder's process still running is the best sign
                os.kill(int(holder["pid"]), 0)
                return True
            except (OSError, KeyError, ValueError):
                return False
        for line in table.splitlines():
            fields = line.split()
            if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                return True
        return False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
