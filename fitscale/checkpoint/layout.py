"""Checkpoint folders on disk: naming, completeness, metadata and which ones retention removes.

A checkpoint is the folder `step-N/` (N without padding) holding DCP's files, DCP's `.metadata`
and our `fitscale.json`. Saving writes `.step-N.tmp/` and renames it when every rank is done, so
a folder named `step-N` is complete by construction; completeness is still checked (both
metadata files present) so that a folder copied by hand or truncated by a full disk is never
taken as the newest. Deletion renames to `.deleting-step-N` first for the same reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from fitscale.errors import UserError

METADATA_FILE = "fitscale.json"
DCP_METADATA_FILE = ".metadata"
FORMAT_VERSION = 1
STEP_PATTERN = re.compile(r"^step-(\d+)$")
SUPERSEDED = "superseded"  # <folder>/superseded/<branch>/step-N: checkpoints of an abandoned branch


def first_failure(error: BaseException) -> str:
    """The first rank's reason from DCP's multi-rank `CheckpointException` (a BaseException whose
    own message only lists ranks), as `Type: message (rank R)`; any other error as `Type: message`."""
    from torch.distributed.checkpoint.api import CheckpointException  # lazy: layout is read without torch

    if isinstance(error, CheckpointException) and error.failures:
        rank = min(error.failures)
        cause = error.failures[rank][0]
        return f"{type(cause).__name__}: {cause} (rank {rank})"
    return f"{type(error).__name__}: {error}"


def step_dirname(step: int) -> str:
    """Folder name of the complete checkpoint of `step`: step-N."""
    return f"step-{step}"


def temporary_dirname(step: int) -> str:
    """Hidden folder name a checkpoint of `step` is written under before it is published (.step-N.tmp)."""
    return f".step-{step}.tmp"


def is_complete(path: Path) -> bool:
    """True for a checkpoint folder whose save finished on every rank."""
    return (path / METADATA_FILE).is_file() and (path / DCP_METADATA_FILE).is_file()


def complete_steps(folder: Path) -> list[int]:
    """Steps of the complete checkpoints in `folder`, ascending; temporary and partial folders are ignored."""
    if not folder.is_dir():
        return []
    steps = []
    for entry in folder.iterdir():
        match = STEP_PATTERN.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            steps.append(int(match.group(1)))
    return sorted(steps)


def resume_step(steps: list[int], resume: str, folder: Path) -> int | None:
    """The step to resume from under `train.resume` (`auto`, `never` or a step number), given the
    complete `steps` of checkpoint `folder`; None for a fresh start."""
    if resume == "auto":
        return steps[-1] if steps else None
    if resume == "never":
        if steps:
            raise FileExistsError(
                f"{folder} already holds checkpoints (steps {steps}); with train.resume=never pick a "
                "new train.run_dir, or set train.resume=auto to continue this run"
            )
        return None
    if not str(resume).isdigit():
        raise UserError(f"train.resume={resume!r} is not `auto`, `never` or a step number")
    step = int(resume)
    if step not in steps:
        raise FileNotFoundError(
            f"train.resume={step}: {folder / step_dirname(step)} is not a complete checkpoint; complete steps in "
            f"{folder}: {steps or 'none'}"
        )
    return step


def steps_to_delete(steps: list[int], newest: int, keep_last: int, keep_every: int) -> list[int]:
    """Complete steps older than `newest` that neither the last-K nor the every-M rule keeps.

    Steps above `newest` (left by a run that was resumed from an older checkpoint) are never
    touched: they are not older, and deleting someone's later history is not retention.
    """
    if keep_last <= 0:
        return []
    candidates = sorted(s for s in steps if s <= newest)
    kept = set(candidates[-keep_last:]) | {newest}
    if keep_every > 0:
        kept |= {s for s in candidates if s % keep_every == 0}
    return [s for s in candidates if s not in kept]


def write_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Write `fitscale.json` durably (write, fsync, rename) so it exists whole or not at all."""
    partial = path / (METADATA_FILE + ".partial")
    with open(partial, "w") as handle:
        json.dump({"format": FORMAT_VERSION, **metadata}, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path / METADATA_FILE)


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata of the checkpoint folder `path` (step, world size, config, format).

    Raises FileNotFoundError when its metadata file is missing (an incomplete checkpoint), ValueError
    when it is not valid JSON or was written in a newer checkpoint format.
    """
    metadata_path = path / METADATA_FILE
    try:
        metadata = json.loads(metadata_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is not a complete fitscale checkpoint: {METADATA_FILE} is missing"
        ) from None
    except json.JSONDecodeError as error:
        raise UserError(
            f"{metadata_path} is not valid JSON ({error}); the checkpoint folder is damaged"
        ) from None
    if metadata.get("format", 0) > FORMAT_VERSION:
        raise UserError(
            f"{path} was written by a newer fitscale (checkpoint format {metadata['format']}, this one reads "
            f"{FORMAT_VERSION}); upgrade fitscale to load it"
        )
    return metadata


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(temporary: Path, final: Path) -> None:
    """Make a finished checkpoint visible with one atomic rename; refuses to replace anything."""
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists; it is never overwritten")
    os.rename(temporary, final)
    fsync_dir(final.parent)


def remove_checkpoint(path: Path) -> None:
    """Hide a checkpoint from `complete_steps` at once (rename), then delete its files."""
    doomed = path.with_name(".deleting-" + path.name)
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def supersede(folder: Path, after: int, branch: str) -> tuple[Path | None, list[int]]:
    """Move every `step-N` folder of `folder` with N > `after` into `folder/superseded/<branch>/`.

    A run resumed from step `after` starts a new branch; the later checkpoints belong to the
    abandoned one. They are kept (nothing written is lost) but moved out of the names that
    `complete_steps`, `train.resume=auto` and retention look at, with one atomic rename each.
    `branch` names the new branch; when that folder already exists, `-2`, `-3`, ... is added.
    Returns (the folder they went to, their steps ascending), or (None, []) when none is later.
    """
    if not folder.is_dir():
        return None, []
    later = sorted(
        (int(match.group(1)), entry)
        for entry in folder.iterdir()
        if (match := STEP_PATTERN.match(entry.name)) and entry.is_dir() and int(match.group(1)) > after
    )
    if not later:
        return None, []
    target = folder / SUPERSEDED / branch
    suffix = 1
    while target.exists():
        suffix += 1
        target = folder / SUPERSEDED / f"{branch}-{suffix}"
    target.mkdir(parents=True)
    for _, entry in later:
        os.rename(entry, target / entry.name)
    fsync_dir(target)
    fsync_dir(folder)
    return target, [step for step, _ in later]


def superseded_steps(folder: Path) -> dict[str, list[int]]:
    """The checkpoints kept from abandoned branches (`supersede`): {branch folder name: its steps}."""
    branches = sorted((folder / SUPERSEDED).iterdir()) if (folder / SUPERSEDED).is_dir() else []
    return {branch.name: complete_steps(branch) for branch in branches if branch.is_dir()}


def remove_leftovers(folder: Path) -> list[str]:
    """Delete temporary folders of saves that never finished and deletions that were interrupted."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.is_dir() and (
            entry.name.startswith(".deleting-") or re.match(r"^\.step-\d+\.tmp$", entry.name)
        ):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


def find_checkpoint(path: str | Path, folder_name: str = "checkpoints") -> Path:
    """A checkpoint folder from a path to the folder itself, to a run's checkpoint folder, or to a run.

    For a run or its checkpoint folder the newest complete checkpoint is taken.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if (path / DCP_METADATA_FILE).is_file():
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is an incomplete checkpoint ({METADATA_FILE} is missing)")
        return path
    for folder in (path, path / folder_name):
        steps = complete_steps(folder)
        if steps:
            return folder / step_dirname(steps[-1])
    raise FileNotFoundError(
        f"{path} holds no complete checkpoint: pass a run folder, its `{folder_name}` folder or a step-N folder"
    )


@contextlib.contextmanager
def single_process_quiet():
    """DCP warns `torch.distributed is disabled, unavailable or uninitialized` on every save or load
    of a lone process; a one-process run or reader is intended, not a mistake.

    Every `dcp.save`, `dcp.async_save` and `dcp.load` of fitscale runs inside this: the manager's,
    and the one-process readers of fitscale.checkpoint.export (`fitscale sample`, `convert export`,
    the demo's closing grid), which printed it on every use.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized"
        )
        yield
