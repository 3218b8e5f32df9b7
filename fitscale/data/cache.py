"""One Streaming reader per cache folder: shared inside a process, exclusive between runs.

Streaming's `StreamingDataset` registers its local folder in shared memory (/dev/shm) and refuses
a folder that another live `StreamingDataset` with a remote has registered ("Reused local
directory"), a multi-line error naming neither the recipe field nor a fix. Three cases meet it:
- two readers in one process: the validation split's probe and its one-pass loader, or train and
  validation on one cache: readers of the same folder and remote share one `StreamingDataset`
  here (`open_streaming_dataset`); the same folder with another remote is refused by field name;
- two runs on one cache folder (of a remote) on one machine: the first run's local leader holds an exclusive
  `flock` on `<folder>/.fitscale-cache.lock` while it lives; the second run fails at once with
  one line naming the field, the folder and the holder's pid;
- a restart after SIGKILL: the lock died with its process, but Streaming's registration can
  outlive it (when the whole process group is killed, Python's resource tracker goes too). Once
  this run holds the lock, nobody alive reads the folder, so registrations that name it are stale
  and are removed (only those: other folders' registrations are left alone).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fitscale.compat import registered_locals, shm_registration_path
from fitscale.errors import UserError
from fitscale.locking import try_lock

LOCK_FILE = ".fitscale-cache.lock"
SHM_DIR = Path("/dev/shm")

_open: dict[str, tuple[str | None, Any, int | None]] = {}  # folder -> (remote, dataset, lock fd)


def open_streaming_dataset(path: str | Path, remote: str | None, cfg, field: str = "data.path"):
    """The StreamingDataset that brings shards into `path` (downloads, decompression, eviction).

    `field` names the recipe field of `path` in errors (data.path or data.val_path). Collective
    when torch.distributed is initialised (every rank of the job calls it for the same folder).
    """
    from fitscale.runtime.agree import all_ranks_agree  # lazy: heavy

    folder = os.path.abspath(path)
    if folder in _open:
        held_remote, dataset, _ = _open[folder]
        if held_remote != remote:
            raise UserError(
                f"{field}={path} is already the cache folder of remote {held_remote!r} in this run, "
                f"here asked to hold {remote!r}: Streaming keeps one dataset per cache folder; give "
                f"{field} a folder of its own"
            )
        return dataset
    # Streaming checks other processes' registrations only for a dataset with a remote.
    claim = remote is not None and _local_leader()
    lock = all_ranks_agree(lambda: _claim(folder, field) if claim else None)
    from streaming import StreamingDataset

    try:
        dataset = StreamingDataset(
            local=folder,
            remote=remote,
            shuffle=False,
            download_timeout=cfg.download_timeout,
            download_retry=cfg.download_retry + 1,  # Streaming counts attempts, the first included
            cache_limit=cfg.cache_limit,
            batch_size=1,
        )
    except ValueError as error:  # Streaming's cache-limit checks: a paragraph each, as one line
        reason = str(error)
        if not reason.startswith(("Cache limit (", "Minimum cache usage (")):
            raise
        raise UserError(
            f"data.cache_limit={cfg.cache_limit}: too small for {field}={path} ({reason.split('. ')[0]}); "
            "raise it to at least four times the largest shard, or unset it to keep every shard"
        ) from None
    _open[folder] = (remote, dataset, lock)
    return dataset


def _local_leader() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _claim(folder: str, field: str) -> int:
    """Lock `folder` for this run (a file descriptor held until the process ends) and clear stale
    registrations of it; ValueError naming `field` when another live process holds it."""
    fd, holder = try_lock(Path(folder) / LOCK_FILE, str(os.getpid()))
    if fd is None:
        raise UserError(
            f"{field}={folder}: this cache folder is in use by another run on this machine "
            f"(pid {holder or 'unknown'}); Streaming allows one reader per cache folder: give this run its "
            f"own {field}"
        )
    remove_stale_registrations(folder)
    return fd


def remove_stale_registrations(folder: str) -> list[str]:
    """Unlink Streaming's shared memory of every registration naming `folder` (call only while
    holding its lock: then no live reader uses them). Returns the names removed.

    Every registration in SHM_DIR is read, whatever its prefix: prefixes are taken in order, but
    other runs' registrations (live, or left by killed jobs) can sit far past any gap, so a walk that
    stops after a run of free prefixes would miss this folder's."""
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN

    if not SHM_DIR.is_dir():
        return []
    prefixes = sorted(
        int(path.name.split("_", 1)[0])
        for path in SHM_DIR.iterdir()
        if path.name.split("_", 1)[0].isdigit()
        and path.name == shm_registration_path(int(path.name.split("_", 1)[0]), LOCALS)
    )
    removed = []
    for prefix in prefixes:
        try:
            registered, _ = registered_locals((SHM_DIR / shm_registration_path(prefix, LOCALS)).read_bytes())
        except (FileNotFoundError, PermissionError, ValueError, UnicodeDecodeError):
            continue
        if folder in registered:
            for name in SHM_TO_CLEAN:
                stale = SHM_DIR / shm_registration_path(prefix, name)
                if stale.exists():
                    stale.unlink()
                    removed.append(stale.name)
    return removed
