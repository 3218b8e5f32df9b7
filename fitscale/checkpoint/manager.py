"""CheckpointManager: every save and load of a run's state goes through here.

The state is a `dict[str, Stateful]` (model, optimizer, EMA, LR schedule, data position, RNGs,
step). Saving is collective: all ranks call `save`/`maybe_save` at the same step boundary. DCP
writes each rank's shards into `.step-N.tmp/`; once every rank has finished, rank 0 adds
`fitscale.json` and renames the folder to `step-N/`, so a crash at any moment leaves either the
new checkpoint complete or the previous ones untouched. Retention then deletes only complete
checkpoints older than the one just published. Loading never deletes or rewrites anything.

Signals (SIGTERM, SIGINT, SIGUSR1, SIGUSR2 by default) only set flags; ranks agree on them with a
tiny all-reduce at step boundaries, so a signal that reached one rank still makes all ranks save
together. A second SIGINT (Ctrl-C twice) stops the process at once with status 130, saying how
many steps since the last checkpoint are lost.

A run resumed from step S while checkpoints of later steps exist starts a new branch: `supersede`
moves those later checkpoints to `superseded/<branch>/` before training, so that every `step-N`
this run publishes is its own, and `save` refuses (CheckpointConflictError) a complete `step-N`
this manager did not write instead of keeping it as if it were new.

The manager's own collectives run on private gloo groups, so they never contend with
NCCL traffic or with the background thread of an asynchronous save.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from fitscale.checkpoint import layout
from fitscale.checkpoint.stateful import PerRankState
from fitscale.config.checkpoint import INTERRUPTED_STATUS, CheckpointConfig
from fitscale.diskspace import is_out_of_space, out_of_space
from fitscale.errors import UserError
from fitscale.runtime.agree import rank0_decides

logger = logging.getLogger(__name__)


class CheckpointMismatchError(UserError):
    """A checkpoint exists but does not fit the state of this run (other model, missing entries)."""


class CheckpointConflictError(RuntimeError):
    """A save found a complete checkpoint of its step that this run did not write (a bug: later
    checkpoints are moved aside by `CheckpointManager.supersede` before a resumed run trains)."""


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors (a DTensor's local shard) and byte strings in a nested state dict."""
    if isinstance(value, torch.Tensor):
        local = getattr(value, "_local_tensor", value)
        return local.numel() * local.element_size()
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    if hasattr(value, "state_dict"):
        return _tensor_bytes(value.state_dict())
    return 0


def _folder_bytes(path: Path) -> int:
    """Bytes of the files under `path`."""
    return sum(entry.stat().st_size for entry in path.rglob("*") if entry.is_file())


class CheckpointManager:
    """Save, publish, retain and load the checkpoints of one run folder (see the module docstring)."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: CheckpointConfig,
        *,
        metadata: dict[str, Any] | None = None,
        handle_signals: bool = True,
    ):
        self.cfg = cfg
        self.folder = Path(run_dir) / cfg.folder
        self.metadata = dict(metadata or {})
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        # Private groups: one for the manager's handshakes, one for DCP's background thread.
        self._group = dist.new_group(backend="gloo") if self.distributed else None
        self._async_group = dist.new_group(backend="gloo") if self.distributed and cfg.async_save else None
        self._pending: tuple[int, Path, Future, dict[str, Any]] | None = None
        self._cleaned = False
        self.save_requested = False
        self.exit_requested = False
        self.last_signal: str | None = None
        self.interrupted = False  # a SIGINT arrived (a second one stops the process at once)
        self.stopping = False  # an exit signal's checkpoint is complete: every rank stops now
        self.current_step = 0  # the last step boundary seen (maybe_save) or loaded
        self.last_checkpoint: int | None = None  # the step of the last checkpoint loaded or published
        # Called on every rank as `on_published(step, path)` once a checkpoint is complete on disk.
        self.on_published: Callable[[int, Path], None] | None = None
        self._written: set[int] = set()  # steps this manager published
        self._previous_handlers: dict[int, Any] = {}
        if handle_signals:
            self.install_signal_handlers()

    # ----------------------------------------------------------------------------- discovery
    def step_path(self, step: int) -> Path:
        """The folder the complete checkpoint of `step` has (or will have)."""
        return self.folder / layout.step_dirname(step)

    def complete_steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (rank 0's view, shared with all ranks)."""
        return self._from_rank0(lambda: layout.complete_steps(self.folder))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None when there is none."""
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def resume_step(self, resume: str = "auto") -> int | None:
        """The step to resume from under `train.resume`: `auto`, `never` or a step number."""
        return layout.resume_step(self.complete_steps(), resume, self.folder)

    def maybe_resume(self, state: dict[str, Any], resume: str = "auto") -> int | None:
        """Load the checkpoint that `resume` names, if any; returns its step."""
        step = self.resume_step(resume)
        if step is None:
            return None
        return self.load(step, state)

    def supersede(self, after: int, branch: str) -> tuple[Path | None, list[int]]:
        """Move the checkpoints of steps after `after` to `superseded/<branch>/` (collective; rank 0
        renames, every rank gets its answer or its error). Returns (their folder, their steps), or
        (None, []) when there were none (layout.supersede)."""
        return self._from_rank0(lambda: layout.supersede(self.folder, after, branch))

    # ----------------------------------------------------------------------------- saving
    def due(self, step: int, force: bool = False) -> bool:
        """Whether a save is due at `step`: `force` (a signal's request included), or `step` on the
        interval (`checkpoint.interval` > 0 divides it). The one definition of the interval rule."""
        return force or (self.cfg.interval > 0 and step % self.cfg.interval == 0)

    def maybe_save(self, step: int, state: dict[str, Any], force: bool = False) -> bool:
        """Save when `step` is on the interval, a signal asked for it, or `force`; call on every rank.

        Also publishes a finished asynchronous save. After a save requested by an exit signal the
        checkpoint is complete on return, and `stopping` tells the loop to stop. Only requests
        agreed at this step boundary count (`_agreed_requests`): a signal that arrives later, on
        one rank or during the save, is acted on at the next check, never by one rank alone.
        """
        self.current_step = step
        self._finish_pending(block=False)
        save_requested, exit_requested = self._agreed_requests(step)
        if not self.due(step, force or save_requested):
            return False
        self.save(step, state)
        if save_requested:
            self.save_requested = False
        if exit_requested:
            self.wait()
            self.stopping = True
        return True

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write `state` as checkpoint `step` (collective); returns its folder.

        A complete `step-N` that this manager wrote already is returned as it is; one it did not
        write raises CheckpointConflictError (nothing is overwritten, and nothing is reported as
        saved that this run did not save).
        """
        self.wait()
        final = self.step_path(step)
        if self.written_already(step):
            return final
        temporary = self.folder / layout.temporary_dirname(step)
        if self.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            if not self._cleaned:
                self._remove_leftovers()
            elif temporary.exists():
                layout.remove_leftovers(self.folder)
        self._barrier()
        dcp_state = self._state_for_saving(state)
        started = time.perf_counter()
        if self.cfg.async_save:
            with layout.single_process_quiet():
                response = dcp.async_save(
                    dcp_state,
                    checkpoint_id=temporary,
                    process_group=self._async_group,
                    **self._single_process_flag(),
                )
            future = getattr(response, "upload_completion", response)
            self._pending = (step, temporary, future, {**self._metadata_for(step, state), "async": True})
            logger.info(
                "checkpoint step %d staged in %.2fs; writing in the background",
                step,
                time.perf_counter() - started,
            )
        else:
            try:
                with layout.single_process_quiet():
                    dcp.save(
                        dcp_state,
                        checkpoint_id=temporary,
                        process_group=self._group,
                        **self._single_process_flag(),
                    )
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as error:  # DCP's CheckpointException is a BaseException
                raise self._failed_save(step, temporary, error, dcp_state) from error
            self._publish(step, temporary, self._metadata_for(step, state))
            logger.info("checkpoint %s written in %.2fs", final, time.perf_counter() - started)
        return final

    def written_already(self, step: int) -> bool:
        """Whether this run already published checkpoint `step` (collective; rank 0 looks). Raises
        CheckpointConflictError when a complete `step-N` exists that this run did not write, before
        anything of the step is written (a backend with files of its own asks first too)."""
        final = self.step_path(step)
        if not self._from_rank0(lambda: layout.is_complete(final)):
            return False
        if step in self._written:
            return True
        raise CheckpointConflictError(
            f"checkpoint {final} already exists and this run did not write it; it is left as it is. "
            f"A run resumed from an earlier step moves later checkpoints to {self.folder / layout.SUPERSEDED} "
            "before training, so this is a bug: please report it with the run folder's metrics.jsonl"
        )

    def remove_leftovers(self) -> None:
        """Delete the unfinished folders (`.step-N.tmp`, `.deleting-step-N`) a killed run left
        (collective). The trainer calls it at start, before anything else is written, so that their
        space is free for the metrics and the first save; complete checkpoints are never touched.
        Call it only while holding the run folder (fitscale.train.state.RunLock): a live run's
        save in progress looks the same."""
        if self.rank == 0:
            self._remove_leftovers()
        self._cleaned = True
        self._barrier()

    def _remove_leftovers(self) -> None:
        removed = layout.remove_leftovers(self.folder)
        if removed:
            logger.warning("removed unfinished checkpoint folders of an earlier run: %s", removed)
        self._cleaned = True

    def wait(self) -> None:
        """Block until a pending asynchronous save is written and published (collective)."""
        self._finish_pending(block=True)

    def close(self) -> None:
        """Finish pending work and restore the signal handlers that were there before."""
        self.wait()
        self.uninstall_signal_handlers()

    def _state_for_saving(self, state: dict[str, Any]) -> dict[str, Any]:
        dcp_state: dict[str, Any] = {}
        for key, value in state.items():
            if isinstance(value, PerRankState):
                dcp_state[key] = {f"rank{self.rank}": value.serialized()}
            else:
                dcp_state[key] = value
        return dcp_state

    def _metadata_for(self, step: int, state: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.metadata,
            "step": step,
            "world_size": self.world_size,
            "keys": sorted(state),
            "per_rank_keys": sorted(k for k, v in state.items() if isinstance(v, PerRankState)),
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "torch_version": torch.__version__,
        }

    def _finish_pending(self, block: bool) -> None:
        if self._pending is None:
            return
        step, temporary, future, metadata = self._pending
        if not block and self.distributed:
            done = torch.tensor([1 if future.done() else 0], dtype=torch.int32)
            dist.all_reduce(done, op=dist.ReduceOp.MIN, group=self._group)
            if not done.item():
                return
        elif not block and not future.done():
            return
        self._pending = None
        try:
            future.result()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # DCP reports failures as CheckpointException (a BaseException)
            raise self._failed_save(step, temporary, error, None) from error
        self._publish(step, temporary, metadata)

    def _failed_save(
        self, step: int, temporary: Path, error: BaseException, dcp_state: dict[str, Any] | None
    ) -> Exception:
        """The one-line error for a save that failed on every rank (DCP raises on all of them); rank 0
        removes the unfinished `.step-N.tmp` (complete checkpoints are never touched).

        A full disk or quota (fitscale.diskspace) becomes an OutOfSpaceError naming the folder, the
        checkpoint's size (that of the newest complete checkpoint, else this rank's tensors times
        the world size), the free bytes and the fix; anything else a RuntimeError with the first
        failing rank's reason.
        """
        steps = layout.complete_steps(self.folder)
        if steps:
            needed = _folder_bytes(self.step_path(steps[-1]))
        else:
            needed = _tensor_bytes(dcp_state) * self.world_size if dcp_state is not None else None
        full = is_out_of_space(error, self.folder, needed)
        if self.rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        kept = "the complete checkpoints are untouched"
        if not full:
            return RuntimeError(
                f"checkpoint step {step} could not be written: {layout.first_failure(error).splitlines()[0]}; "
                f"its unfinished folder {temporary} was removed and {kept}"
            )
        keep = self.cfg.keep_last
        retention = (
            f"lower checkpoint.keep_last (now {keep}: a save needs room for the new checkpoint beside the kept ones)"
            if keep > 0
            else "set checkpoint.keep_last (now 0: every checkpoint is kept)"
        )
        return out_of_space(
            self.folder,
            f"checkpoint step {step}",
            f"its unfinished folder {temporary.name} was removed and {kept}. Free space there, {retention}, "
            "or point train.run_dir / checkpoint.folder at a larger filesystem; a rerun resumes from the "
            "newest complete checkpoint",
            needed,
            error,
        )

    def _publish(self, step: int, temporary: Path, metadata: dict[str, Any]) -> None:
        """All ranks finished writing: rank 0 adds fitscale.json, renames, then applies retention."""
        self._barrier()
        if self.rank == 0:
            layout.write_metadata(temporary, metadata)
            layout.publish(temporary, self.step_path(step))
            self._apply_retention(step)
        self._barrier()
        self._written.add(step)
        self.last_checkpoint = step
        if self.on_published is not None:
            self.on_published(step, self.step_path(step))

    def _apply_retention(self, newest: int) -> None:
        doomed = layout.steps_to_delete(
            layout.complete_steps(self.folder), newest, self.cfg.keep_last, self.cfg.keep_every
        )
        for step in doomed:
            layout.remove_checkpoint(self.step_path(step))
        if doomed:
            logger.info("retention removed checkpoints %s", doomed)

    # ----------------------------------------------------------------------------- loading
    def load(self, step_or_path: int | str | Path, state: dict[str, Any]) -> int:
        """Restore `state` in place from a complete checkpoint (collective); returns its step.

        Never deletes or modifies anything on disk. A checkpoint that does not fit (another model,
        missing entries) raises CheckpointMismatchError naming the folder and the first problem.
        """
        self.wait()
        path = self.step_path(step_or_path) if isinstance(step_or_path, int) else Path(step_or_path)
        metadata = self._from_rank0(lambda: self._read_complete(path))
        saved_world = int(metadata["world_size"])
        dcp_state, per_rank = self._state_for_loading(state, path, metadata)
        try:
            with layout.single_process_quiet():
                dcp.load(
                    dcp_state, checkpoint_id=path, process_group=self._group, **self._single_process_flag()
                )
        except (CheckpointException, RuntimeError, KeyError, ValueError) as error:
            raise CheckpointMismatchError(
                f"checkpoint {path} (step {metadata['step']}, {saved_world} ranks) does not fit this run: "
                f"{layout.first_failure(error)}"
            ) from None
        for key, value in per_rank.items():
            saved = {int(name[len("rank") :]): data for name, data in dcp_state[key].items()}
            value.restore(saved, self.rank, self.world_size, saved_world)
        logger.info("loaded checkpoint %s", path)
        self.last_checkpoint = self.current_step = int(metadata["step"])
        return self.last_checkpoint

    def _read_complete(self, path: Path) -> dict[str, Any]:
        """The metadata of the complete checkpoint `path` (read by rank 0 only)."""
        if not layout.is_complete(path):
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint; complete steps in {self.folder}: "
                f"{layout.complete_steps(self.folder) or 'none'}"
            )
        return layout.read_metadata(path)

    def _state_for_loading(
        self, state: dict[str, Any], path: Path, metadata: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, PerRankState]]:
        saved_world = int(metadata["world_size"])
        saved_per_rank = set(metadata.get("per_rank_keys", []))
        dcp_state: dict[str, Any] = {}
        per_rank: dict[str, PerRankState] = {}
        for key, value in state.items():
            if not isinstance(value, PerRankState):
                dcp_state[key] = value
                continue
            if key not in saved_per_rank:
                raise CheckpointMismatchError(
                    f"checkpoint {path} has no per-rank entry {key!r} (it holds {sorted(saved_per_rank) or 'none'})"
                )
            if saved_world == self.world_size:
                ranks = [self.rank]
            elif value.reshard is not None:
                ranks = list(range(saved_world))
            else:
                raise CheckpointMismatchError(
                    f"checkpoint {path} was written by {saved_world} ranks and this run has {self.world_size}; "
                    f"per-rank state {key!r} ({type(value.stateful).__name__}) has no resharding rule: give "
                    "PerRankState a `reshard` function or resume on the same number of ranks"
                )
            dcp_state[key] = {f"rank{r}": b"" for r in ranks}
            per_rank[key] = value
        return dcp_state, per_rank

    # ----------------------------------------------------------------------------- signals
    def install_signal_handlers(self) -> None:
        """Route the configured signals to flags (main thread only; elsewhere this does nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.cfg.save_signals:
            signum = getattr(signal, name)
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def uninstall_signal_handlers(self) -> None:
        """Restore the signal handlers that `install_signal_handlers` replaced."""
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT":
            if self.interrupted:
                self._stop_now()
            self.interrupted = True
            if self.rank == 0:
                logger.warning(
                    "interrupted: finishing step %d, then saving a checkpoint and stopping; interrupt again to "
                    "stop at once (%s)",
                    self._next_agreement_step(),
                    self._lost_steps(),
                )
        self.last_signal = name
        self.save_requested = True
        if name in self.cfg.exit_signals:
            self.exit_requested = True

    def _next_agreement_step(self) -> int:
        """The step after which a signal that arrives now is acted on (every `signal_check_every`
        steps on several ranks, the next step in one process)."""
        every = self.cfg.signal_check_every if self.distributed else 1
        return (self.current_step // every + 1) * every

    def _lost_steps(self) -> str:
        """How many steps a stop now would lose: those since the last checkpoint loaded or written."""
        lost = self.current_step - (self.last_checkpoint or 0)
        since = f"checkpoint step-{self.last_checkpoint}" if self.last_checkpoint is not None else "the start"
        return f"{lost} step(s) since {since} would be lost"

    def _stop_now(self) -> None:
        """A second SIGINT: leave at once, without saving, with status 130 (no cleanup runs: a pending
        save stays an unpublished temporary folder that the next run removes; the run-folder lock is
        an flock, released by the kernel)."""
        lost = self._lost_steps().replace("would be", "are")
        sys.stderr.write(f"interrupted again: stopping at once without saving; {lost}\n")
        sys.stderr.flush()
        os._exit(INTERRUPTED_STATUS)

    def _agreed_requests(self, step: int) -> tuple[bool, bool]:
        """(save, exit) as every rank acts on them at `step`: one process reads its flags; ranks
        all-reduce theirs every `signal_check_every` steps and act on nothing in between."""
        if not self.distributed:
            return self.save_requested, self.exit_requested
        if step % self.cfg.signal_check_every != 0:
            return False, False
        flags = torch.tensor([int(self.save_requested), int(self.exit_requested)], dtype=torch.int32)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._group)
        save_requested, exit_requested = bool(flags[0]), bool(flags[1])
        self.save_requested |= save_requested
        self.exit_requested |= exit_requested
        return save_requested, exit_requested

    # ----------------------------------------------------------------------------- collectives
    def _single_process_flag(self) -> dict[str, bool]:
        """`no_dist=True` without a process group (the keyword only where needed: older torch lacks it)."""
        return {} if self.distributed else {"no_dist": True}

    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self._group)

    def _from_rank0(self, compute):
        """Rank 0 looks at the file system and tells everyone (its errors too), so ranks never
        disagree on what exists (fitscale.runtime.agree)."""
        return rank0_decides(compute, self._group)
