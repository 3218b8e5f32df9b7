"""Packed steps built in the loader's workers, and how they reach the trainer's process.

Building (`MaterializeStep`): for each micro-batch of a step, sizes, labels and ids come from
the sample table in a few vectorised expressions; each image's chosen variant is copied from
the mapped shard (`ShardReader`) straight into the step's float32 token buffer; positions are
one `divmod`; NaN / inf is checked once per micro-batch (the image at fault is looked up only
then). The result equals `pack_images` of the decoded samples, bit for bit.

Moving: a step's tokens and positions are some 80 bytes per token, megabytes per step. Through
the worker's result pipe they cost a pickle copy and a write in the worker and a read, a copy
and an unpickle in the trainer's process, about two thirds of that process's loader time
(docs/benchmarks.md, "Data loader"); torch's own tensor pickling is slower still (one shared
memory segment and file-descriptor handshake per tensor). So with process workers the two big
arrays of every micro-batch of a step are built in place in one file under /dev/shm; only its
name and the small arrays cross the pipe, and the trainer's process maps the file (unlinking it
at once, so the memory goes when the last tensor does) and views the arrays without a copy.
Files of steps still in flight when the pipeline stops are removed by `remove_leftovers`.
Without /dev/shm, or when it is full, the step goes through the pipe as plain array bytes.
"""

from __future__ import annotations

import itertools
import mmap
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from fitscale.config.data import DataConfig
from fitscale.data.batch import PackedBatch, cu_seqlens_from_lengths, padding_batch, padding_lengths
from fitscale.data.format import COLS, CROP_COLS, CROP_ROWS, LABEL, ROWS, SOURCE_ID
from fitscale.data.reader import ShardReader
from fitscale.errors import UserError

SHM_DIR = Path("/dev/shm")


def token_bytes(token_dim: int) -> int:
    """Bytes of one packed token: float32 values and int64 (row, col)."""
    return token_dim * 4 + 2 * 8


_STEP_NUMBERS = itertools.count()
WIDEN_CHUNK = 2000  # tokens per float16 -> float32 copy: 32,000 values, under torch's grain of 32,768


class PipedBatch(PackedBatch):
    """A PackedBatch that crosses a pipe as plain array bytes and arrives as a PackedBatch.

    Used when a step cannot go through shared memory; far cheaper than torch's per-tensor
    shared-memory handshake.
    """

    def __reduce__(self):
        values = {f.name: getattr(self, f.name) for f in fields(PackedBatch)}
        return _unpipe, ({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in values.items()},)


def _unpipe(values: dict) -> PackedBatch:
    return PackedBatch(
        **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in values.items()}
    )


@dataclass
class Layout:
    """A micro-batch's segments (images, then the padding segments if any), from the sample table."""

    work: np.ndarray  # (N, 3) sample, crop, flip
    rows: np.ndarray
    cols: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    lengths: np.ndarray  # tokens per segment
    real: int  # tokens of real images

    @property
    def total(self) -> int:
        """Tokens of all segments, padding included."""
        return int(self.lengths.sum())

    def small_arrays(self) -> dict:
        """The PackedBatch fields other than tokens and positions: cu_seqlens (int32), max_seqlen,
        labels, sizes, ids, flips.
        """
        cu_seqlens = cu_seqlens_from_lengths(self.lengths).numpy()
        return {
            "cu_seqlens": cu_seqlens,
            "max_seqlen": int(self.lengths.max()),
            "labels": self.labels.astype(np.int64),
            "sizes": np.stack([self.rows, self.cols], axis=1).astype(np.int64),
            "sample_ids": self.ids.astype(np.int64),
            "num_images": len(self.work),
            "flips": np.concatenate([self.work[:, 2], np.full(len(self.lengths) - len(self.work), -1)]),
        }


class SharedStep:
    """A step whose big arrays lie in one shared-memory file; unpickles as its micro-batches."""

    def __init__(self, path: str, nbytes: int, entries: list[dict]):
        self.path, self.nbytes, self.entries = path, nbytes, entries

    def __reduce__(self):
        return attach_step, (self.path, self.nbytes, self.entries)


def attach_step(path: str, nbytes: int, entries: list[dict]) -> list[PackedBatch]:
    """Map a worker's step file, remove its name, and view the micro-batches in it."""
    fd = os.open(path, os.O_RDWR)
    try:
        mapped = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
    finally:
        os.close(fd)
        os.unlink(path)
    return batches_from(np.frombuffer(mapped, np.uint8), entries)


def batches_from(buffer: np.ndarray, entries: list[dict], kind: type = PackedBatch) -> list[PackedBatch]:
    """The micro-batches whose tokens and positions lie in `buffer`, viewed without a copy."""
    batches = []
    for entry in entries:
        if "batch" in entry:
            batches.append(entry["batch"])
            continue
        values = dict(entry)
        tokens, pos = token_views(buffer, values.pop("offset"), values.pop("tokens"), values.pop("token_dim"))
        small = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in values.items()}
        batches.append(kind(tokens=torch.from_numpy(tokens), pos=torch.from_numpy(pos), **small))
    return batches


def token_views(buffer: np.ndarray, offset: int, count: int, token_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, token_dim) float32 tokens then (count, 2) int64 positions, from `offset` on."""
    split = offset + count * token_dim * 4
    tokens = buffer[offset:split].view(np.float32).reshape(count, token_dim)
    pos = buffer[split : split + count * 16].view(np.int64).reshape(count, 2)
    return tokens, pos


def create_shared(prefix: str, nbytes: int) -> tuple[str, mmap.mmap] | None:
    """A new file of `nbytes` under /dev/shm, mapped; None when there is no room for it."""
    path = f"{prefix}-{os.getpid()}-{next(_STEP_NUMBERS)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)  # no room fails here, not as SIGBUS on a later write
        return path, mmap.mmap(fd, nbytes)
    except OSError:
        os.unlink(path)
        return None
    finally:
        os.close(fd)


def shared_prefix(cfg: DataConfig) -> str | None:
    """Name prefix of this pipeline's step files, when its workers are processes and /dev/shm exists."""
    if cfg.num_workers == 0 or cfg.worker_method != "process" or not SHM_DIR.is_dir():
        return None
    return str(SHM_DIR / f"fitscale-step-{os.getpid()}-{os.urandom(4).hex()}")


def remove_leftovers(prefix: str | None) -> None:
    """Delete the step files that workers wrote but the pipeline never took in."""
    if prefix is not None:
        for path in SHM_DIR.glob(Path(prefix).name + "-*"):
            path.unlink(missing_ok=True)


class MaterializeStep:
    """Reads the planned samples of a step and packs them; runs inside the worker processes."""

    def __init__(
        self, reader: ShardReader, table: np.ndarray, cfg: DataConfig, where: str, prefix: str | None = None
    ):
        self.reader, self.table, self.where, self.prefix = reader, table, where, prefix
        self.pad_to = cfg.token_budget if cfg.pad_to_budget else None
        self.null_class = cfg.num_classes
        self.token_dim = reader.token_dim

    def describe(self, index: int) -> str:
        """Where sample `index` comes from (source, shard), for error messages."""
        shard, local = (int(v[0]) for v in self.reader.locate(np.asarray([index])))
        try:
            source = repr(self.reader.source(shard, local))
        except Exception:  # the shard is already known to be damaged; name what we can
            source = "unreadable"
        return f"{self.where}: sample {index} (source {source}, shard {self.reader.layouts[shard].basename})"

    def layout(self, work: np.ndarray) -> Layout:
        """The segments of a micro-batch of planned `work` rows (sample, crop, flip), padded to the token
        budget when `data.pad_to_budget`; ValueError when the images exceed the budget.
        """
        rows_of = self.table[work[:, 0]]
        crop = work[:, 1].astype(bool)
        rows = np.where(crop, rows_of[:, CROP_ROWS], rows_of[:, ROWS])
        cols = np.where(crop, rows_of[:, CROP_COLS], rows_of[:, COLS])
        labels, ids = rows_of[:, LABEL], rows_of[:, SOURCE_ID]
        lengths = rows * cols
        real = int(lengths.sum())
        if self.pad_to is not None:
            if real > self.pad_to:
                raise ValueError(f"{real} tokens do not fit the token budget of {self.pad_to}")
            if real < self.pad_to:
                pad = np.asarray(padding_lengths(self.pad_to - real))
                rows, cols = np.append(rows, np.ones_like(pad)), np.append(cols, pad)
                labels = np.append(labels, np.full_like(pad, self.null_class))
                ids, lengths = np.append(ids, np.full_like(pad, -1)), np.append(lengths, pad)
        return Layout(work, rows, cols, labels, ids, lengths, real)

    def copy_tokens(self, layout: Layout, out: np.ndarray) -> None:
        """Every image's chosen variant into `out` (float32), in order.

        float16 latents (the usual case) are gathered as they are and widened by torch copies at
        the end: numpy widens float16 without SIMD, some 15x slower than torch's F16C path. The
        copies stay under torch's parallel grain size, so they never wake its thread pool (which,
        with workers on every core, costs far more than the copy).
        """
        shards, locals_ = self.reader.locate(layout.work[:, 0])
        half = np.empty((layout.real, self.token_dim), np.float16)
        halves: list[tuple[int, int]] = []  # token ranges gathered in `half`
        start = 0
        for (index, crop, flip), shard, local, length in zip(
            layout.work.tolist(), shards.tolist(), locals_.tolist(), layout.lengths.tolist()
        ):
            values = self.reader.variant(shard, local, crop, flip, length)
            if values is None:
                values = self.checked_variant(index, shard, local, crop, flip, length)
            if values.dtype == np.float16:
                half[start : start + length] = values
                if halves and halves[-1][1] == start:
                    halves[-1] = (halves[-1][0], start + length)
                else:
                    halves.append((start, start + length))
            else:
                out[start : start + length] = values
            start += length
        for first, last in halves:
            for at in range(first, last, WIDEN_CHUNK):
                end = min(at + WIDEN_CHUNK, last)
                torch.from_numpy(out[at:end]).copy_(torch.from_numpy(half[at:end]))

    def checked_variant(
        self, index: int, shard: int, local: int, crop: int, flip: int, length: int
    ) -> np.ndarray:
        """Decode one sample on its own, to say what is wrong with it."""
        try:
            variants = self.reader.variants(shard, local, bool(crop))
        except Exception as error:
            raise UserError(
                f"{self.where}: sample {index} in shard {self.reader.layouts[shard].basename} cannot "
                f"be read ({type(error).__name__}: {error}); the shard is corrupt, rewrite the dataset"
            ) from error
        shape = variants.shape
        if len(shape) != 3 or shape[2] != self.token_dim or shape[1] != length or shape[0] <= flip:
            raise UserError(
                f"{self.describe(index)}: tokens of shape {shape}, expected "
                f"(V, {length}, {self.token_dim}) for its grid and p*p*C; rewrite the dataset"
            )
        return variants[flip]

    def fill(self, layout: Layout, tokens: np.ndarray, pos: np.ndarray) -> None:
        """Tokens (padding zeroed) and (row, col) positions of every segment, checked for NaN / inf."""
        real = layout.real
        self.copy_tokens(layout, tokens)
        if not np.isfinite(tokens[:real]).all():
            ends = np.cumsum(layout.lengths)
            bad = int(np.searchsorted(ends, np.flatnonzero(~np.isfinite(tokens[:real]).all(1))[0], "right"))
            raise UserError(
                f"{self.describe(int(layout.work[bad, 0]))}: latents hold NaN or inf; rewrite the dataset"
            )
        tokens[real:] = 0.0
        starts = np.cumsum(layout.lengths) - layout.lengths
        within = np.arange(layout.total) - np.repeat(starts, layout.lengths)
        np.divmod(within, np.repeat(layout.cols, layout.lengths), out=(pos[:, 0], pos[:, 1]))

    def micro_batch(self, work: np.ndarray) -> PackedBatch:
        """The packed micro-batch of (N, 3) sample, crop, flip rows, in this process's memory."""
        return self([work])[0]

    def __call__(self, work: list[np.ndarray]) -> list[PackedBatch] | SharedStep:
        """The packed micro-batches of one step (`StepPlan.work`), in one buffer."""
        layouts = [self.layout(images) if len(images) else None for images in work]
        offsets = np.cumsum(
            [0] + [layout.total * token_bytes(self.token_dim) if layout else 0 for layout in layouts]
        )
        nbytes = int(offsets[-1])
        shared = create_shared(self.prefix, nbytes) if self.prefix is not None and nbytes else None
        buffer = np.frombuffer(shared[1], np.uint8) if shared else np.empty(nbytes, np.uint8)
        entries: list[dict] = []
        try:
            for layout, offset in zip(layouts, offsets.tolist()):
                if layout is None:
                    padding = padding_batch(self.pad_to or 1, self.token_dim, self.null_class)
                    entries.append(
                        {"batch": PipedBatch(**{f.name: getattr(padding, f.name) for f in fields(padding)})}
                    )
                    continue
                tokens, pos = token_views(buffer, offset, layout.total, self.token_dim)
                self.fill(layout, tokens, pos)
                entries.append(
                    {
                        "offset": offset,
                        "tokens": layout.total,
                        "token_dim": self.token_dim,
                        **layout.small_arrays(),
                    }
                )
        except BaseException:
            if shared:
                os.unlink(shared[0])
            raise
        if shared:
            return SharedStep(shared[0], nbytes, entries)
        return batches_from(buffer, entries, PipedBatch)
