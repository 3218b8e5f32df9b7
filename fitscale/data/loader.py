"""The training loader: Streaming shards -> planned, packed micro-batches, one step at a time.

Pipeline (torchdata nodes, each a stateful piece):
    PlanSource      this rank's micro-batch plans, from the global `StepPlanner` (metadata only)
    ParallelMapper  worker processes read the planned samples from a `StreamingDataset`
                    (local folder, or remote URI cached locally) and pack them (`pack_images`)
    PinMemory       optional, when CUDA is present
    Prefetcher      keeps micro-batches ready ahead of the trainer
`LatentLoader` groups the micro-batches of a step into a `StepBatch`.

Resume guarantee: `state_dict()` is the planner state after the last step handed to the
trainer (epoch, stream cursor, images waiting in the token packer), identical on every rank
and independent of the world size, so no collective is needed. `load_state_dict` on the same
world size continues bit-identically; on another world size the run continues with the rest of
the same global sample sequence: within the epoch no image is seen twice and none is skipped.
Each node caches the shards it reads (every rank reads samples from every shard).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from fitscale.config.data import DataConfig
from fitscale.data.batch import PackedBatch, padding_batch
from fitscale.data.format import (
    COLS,
    CROP_COLS,
    CROP_ROWS,
    LABEL,
    META_FILE,
    ROWS,
    SAMPLES_FILE,
    SOURCE_ID,
    TOKEN_DIM,
    check_local_shards,
    read_index,
    read_meta,
    read_sample_table,
)
from fitscale.data.packing import PlannedImage, SampleCatalog, StepPlanner
from fitscale.data.reader import ShardReader

STATE_VERSION = 1


@dataclass
class StepBatch:
    """Everything one rank computes in one optimizer step."""

    micro_batches: list[PackedBatch]
    global_num_images: int | None  # known in "images" mode; None in "tokens" mode (all-reduce it)


@dataclass
class StepPlan:
    """This rank's share of one optimizer step, as planned in the main process."""

    micro_batches: list[list[PlannedImage]]
    state: dict  # planner state after this step
    global_num_images: int | None

    def work(self) -> list[np.ndarray]:
        """What a worker needs to build the step: per micro-batch (N, 3) int64 of sample, crop, flip."""
        return [
            np.array([image[1:4] for image in images], dtype=np.int64).reshape(-1, 3)
            for images in self.micro_batches
        ]


def fetch_remote_file(remote: str, local: Path, timeout: float) -> None:
    """Download `remote` to `local` unless present; a per-process temporary name avoids races."""
    if local.exists():
        return
    from streaming.base.storage.download import CloudDownloader

    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f"{local.name}.{os.getpid()}.part")
    CloudDownloader.direct_download(remote, str(tmp), timeout)
    os.replace(tmp, local)


def open_streaming_dataset(path: str, remote: str | None, cfg: DataConfig):
    """The StreamingDataset that brings shards into `path`: downloads, decompression, eviction."""
    from streaming import StreamingDataset

    return StreamingDataset(
        local=path,
        remote=remote,
        shuffle=False,
        download_timeout=cfg.download_timeout,
        cache_limit=cfg.cache_limit,
        batch_size=1,
    )


def open_shard_reader(path: Path, cfg: DataConfig) -> ShardReader:
    """Direct reads of the shards in `path`, which a StreamingDataset fills when it is a cache.

    A local dataset of uncompressed shards needs no StreamingDataset at all (importing Streaming
    alone takes seconds); a remote one, or compressed shards not yet unpacked, does.
    """
    if cfg.remote is not None:
        cache = open_streaming_dataset(str(path), cfg.remote, cfg)
        return ShardReader(path, read_index(path), cache)
    check_local_shards(path)  # names a missing or truncated shard before training starts
    index = read_index(path)
    packed = any(
        shard.get("zip_data") and not (path / shard["raw_data"]["basename"]).exists()
        for shard in index["shards"]
    )
    cache = open_streaming_dataset(str(path), None, cfg) if packed else None
    return ShardReader(path, index, cache)


class PipedBatch(PackedBatch):
    """A PackedBatch that crosses from a worker process to the trainer as plain array bytes.

    torch pickles every tensor as its own shared-memory segment whose file descriptor the
    receiver then fetches from the sender, several milliseconds per tensor; copying a
    micro-batch's few hundred kilobytes through the pipe costs a fraction of that
    (docs/benchmarks.md, "Data loader"). It arrives as a plain PackedBatch.
    """

    def __reduce__(self):
        values = {f.name: getattr(self, f.name) for f in fields(PackedBatch)}
        return _unpipe, ({k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in values.items()},)


def _unpipe(values: dict) -> PackedBatch:
    return PackedBatch(
        **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in values.items()}
    )


class MaterializeStep:
    """Reads the planned samples of a step and packs them; runs inside the worker processes.

    One pass per micro-batch: each image's chosen variant is copied from the mapped shard
    straight into one float32 token buffer; positions, boundaries and labels come from a few
    vectorised expressions over the sample table; NaN / inf is checked once over the buffer
    (the image at fault is looked up only then). The result equals `pack_images` of the
    decoded samples, bit for bit.
    """

    def __init__(self, reader: ShardReader, table: np.ndarray, cfg: DataConfig, where: str):
        self.reader, self.table, self.where = reader, table, where
        self.pad_to = cfg.token_budget if cfg.pad_to_budget else None
        self.null_class = cfg.num_classes

    def describe(self, index: int) -> str:
        shard, local = (int(v[0]) for v in self.reader.locate(np.asarray([index])))
        try:
            source = repr(self.reader.source(shard, local))
        except Exception:  # the shard is already known to be damaged; name what we can
            source = "unreadable"
        return f"{self.where}: sample {index} (source {source}, shard {self.reader.layouts[shard].basename})"

    def copy_tokens(self, work: np.ndarray, lengths: np.ndarray, out: np.ndarray) -> None:
        shards, locals_ = self.reader.locate(work[:, 0])
        start = 0
        for (index, crop, flip), shard, local, length in zip(
            work.tolist(), shards.tolist(), locals_.tolist(), lengths.tolist()
        ):
            try:
                variants = self.reader.variants(shard, local, crop)
            except Exception as error:
                raise ValueError(
                    f"{self.where}: sample {index} in shard {self.reader.layouts[shard].basename} cannot "
                    f"be read ({type(error).__name__}: {error}); the shard is corrupt, rewrite the dataset"
                ) from error
            shape = variants.shape
            if len(shape) != 3 or shape[2] != TOKEN_DIM or shape[1] != length or shape[0] <= flip:
                raise ValueError(
                    f"{self.describe(index)}: tokens of shape {shape}, expected "
                    f"(V, {length}, {TOKEN_DIM}) for its grid and p*p*C; rewrite the dataset"
                )
            out[start : start + length] = variants[flip]
            start += length

    def __call__(self, work: list[np.ndarray]) -> list[PackedBatch]:
        """The packed micro-batches of one step (`StepPlan.work`); one message back per step."""
        return [self.micro_batch(images) for images in work]

    def micro_batch(self, work: np.ndarray) -> PackedBatch:
        """The packed micro-batch of (N, 3) sample, crop, flip rows."""
        if not len(work):
            return padding_batch(self.pad_to or 1, TOKEN_DIM, self.null_class)
        rows_of = self.table[work[:, 0]]
        crop = work[:, 1].astype(bool)
        rows = np.where(crop, rows_of[:, CROP_ROWS], rows_of[:, ROWS])
        cols = np.where(crop, rows_of[:, CROP_COLS], rows_of[:, COLS])
        labels, ids = rows_of[:, LABEL], rows_of[:, SOURCE_ID]
        lengths = rows * cols
        total = int(lengths.sum())
        pad = 0 if self.pad_to is None else self.pad_to - total
        if pad < 0:
            raise ValueError(f"{total} tokens do not fit the token budget of {self.pad_to}")
        tokens = np.empty((total + pad, TOKEN_DIM), np.float32)
        self.copy_tokens(work, lengths, tokens)
        if not np.isfinite(tokens[:total]).all():
            ends = np.cumsum(lengths)
            bad = int(np.searchsorted(ends, np.flatnonzero(~np.isfinite(tokens[:total]).all(1))[0], "right"))
            raise ValueError(
                f"{self.describe(int(work[bad, 0]))}: latents hold NaN or inf; rewrite the dataset"
            )
        if pad:
            tokens[total:] = 0.0
            rows, cols = np.append(rows, 1), np.append(cols, pad)
            labels, ids = np.append(labels, self.null_class), np.append(ids, -1)
            lengths = np.append(lengths, pad)
        cu_seqlens = np.zeros(lengths.size + 1, np.int32)
        np.cumsum(lengths, out=cu_seqlens[1:])
        within = np.arange(total + pad) - np.repeat(cu_seqlens[:-1].astype(np.int64), lengths)
        width = np.repeat(cols, lengths)
        return PipedBatch(
            tokens=torch.from_numpy(tokens),
            pos=torch.from_numpy(np.stack([within // width, within % width], axis=1)),
            cu_seqlens=torch.from_numpy(cu_seqlens),
            max_seqlen=int(lengths.max()),
            labels=torch.from_numpy(labels.astype(np.int64)),
            sizes=torch.from_numpy(np.stack([rows, cols], axis=1).astype(np.int64)),
            sample_ids=torch.from_numpy(ids.astype(np.int64)),
            num_images=len(work),
        )


def _plan_source_class():
    import torchdata.nodes as tn

    class PlanSource(tn.BaseNode):
        """This rank's work, one step at a time; its state is the global planner state.

        The plans themselves (with the planner state after each step) stay in this process, in
        `planned`, in the order of their work items; workers receive only `StepPlan.work`, and
        the pipeline keeps that order (`in_order=True`), so the consumer pairs each step's
        packed micro-batches with the next plan.
        """

        def __init__(self, planner: StepPlanner, rank: int, world_size: int):
            super().__init__()
            self.planner, self.rank, self.world_size = planner, rank, world_size
            self.planned: deque[StepPlan] = deque()

        def reset(self, initial_state: dict | None = None) -> None:
            super().reset(initial_state)
            if initial_state is not None:
                self.planner.load_state(initial_state)
            self.planned.clear()

        def next(self) -> list[np.ndarray]:
            plan = self.next_plan()
            self.planned.append(plan)
            return plan.work()

        def next_plan(self) -> StepPlan:
            per_rank = self.planner.next_step(self.world_size)
            num_images = sum(len(b) for bins in per_rank for b in bins)
            global_images = num_images if self.planner.batch_mode == "images" else None
            return StepPlan(per_rank[self.rank], self.planner.state(), global_images)

        def get_state(self) -> dict:
            return self.planner.state()

    return PlanSource


class LatentLoader:
    """Iterable of `StepBatch`es for one rank; epochs roll over by themselves (see `epoch`)."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, *, validation: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size {world_size})")
        self.cfg = cfg.validation() if validation else cfg
        self.rank, self.world_size = rank, world_size
        cfg = self.cfg
        path = Path(cfg.path)
        if cfg.remote is not None:
            remote = cfg.remote.rstrip("/")
            for name in (META_FILE, SAMPLES_FILE):
                fetch_remote_file(f"{remote}/{name}", path / name, cfg.download_timeout)
        self.meta = read_meta(path)
        self.reader = open_shard_reader(path, cfg)
        table = read_sample_table(path, int(self.reader.starts[-1]))
        self.table = table
        self.catalog = SampleCatalog(
            table,
            seed=cfg.seed,
            flip_prob=cfg.flip_prob,
            crop_prob=cfg.crop_prob,
            min_tokens=cfg.min_image_tokens,
            max_tokens=cfg.max_image_tokens,
            token_budget=cfg.token_budget,
            num_classes=cfg.num_classes,
            where=str(path),
        )
        self.num_samples = int(self.catalog.eligible.size)
        self.num_skipped_small = self.catalog.num_skipped_small
        self._state = self._new_planner().state()
        self._nodes: list = []

    def _new_planner(self) -> StepPlanner:
        cfg = self.cfg
        return StepPlanner(
            self.catalog,
            batch_mode=cfg.batch_mode,
            global_batch_size=cfg.global_batch_size,
            token_budget=cfg.token_budget,
            micro_batches_per_step=cfg.micro_batches_per_step,
            lookahead=cfg.packing_lookahead,
            seed=cfg.seed,
            shuffle=cfg.shuffle,
        )

    @property
    def epoch(self) -> int:
        """Epoch of the next sample the loader will take from the order."""
        return int(self._state["epoch"])

    def _build_pipeline(self) -> list:
        """The torchdata nodes from source to output; the last one is iterated.

        The nodes take no snapshots of their sources (`snapshot_frequency=0`): the loader's own
        state is the planner state carried by the plans, and a per-item snapshot would copy the
        packer's waiting list for every micro-batch.
        """
        import torchdata.nodes as tn

        cfg = self.cfg
        self._source = source = _plan_source_class()(self._new_planner(), self.rank, self.world_size)
        source.reset(self._state)
        materialize = MaterializeStep(self.reader, self.table, cfg, str(cfg.path))
        nodes = [
            tn.ParallelMapper(
                source,
                materialize,
                num_workers=cfg.num_workers,
                in_order=True,
                method=cfg.worker_method,
                snapshot_frequency=0,
            )
        ]
        if cfg.pin_memory and torch.cuda.is_available():
            nodes.append(tn.PinMemory(nodes[-1], snapshot_frequency=0))
        prefetch = cfg.prefetch * max(1, cfg.num_workers)
        nodes.append(tn.Prefetcher(nodes[-1], prefetch_factor=prefetch, snapshot_frequency=0))
        return nodes

    def close(self) -> None:
        """Stop the workers of a running pipeline, consumer side first."""
        for node in reversed(self._nodes):
            iterator = getattr(node, "_it", None)
            while iterator is not None:
                if hasattr(iterator, "_shutdown"):
                    iterator._shutdown()
                iterator = getattr(iterator, "_it", None)
        self._nodes = []

    def __iter__(self):
        self.close()
        self._nodes = self._build_pipeline()
        try:
            for micro_batches in self._nodes[-1]:
                plan = self._source.planned.popleft()
                if [mb.num_images for mb in micro_batches] != [len(images) for images in plan.micro_batches]:
                    raise RuntimeError("loader pipeline out of order: a step does not match its plan")
                self._state = plan.state
                yield StepBatch(micro_batches, plan.global_num_images)
        finally:
            self.close()

    def state_dict(self) -> dict:
        """The position after the last step yielded; the same on every rank, any world size."""
        cfg = self.cfg
        return {
            "version": STATE_VERSION,
            "num_samples": self.num_samples,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "epoch": int(self._state["epoch"]),
            "cursor": int(self._state["cursor"]),
            "waiting": [list(map(int, pair)) for pair in self._state["waiting"]],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, saved on any world size (see the module docstring)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key in ("num_samples", "seed", "shuffle"):
            current = self.num_samples if key == "num_samples" else getattr(self.cfg, key)
            if state[key] != current:
                raise ValueError(
                    f"loader state was saved with {key}={state[key]!r} but this run has {current!r}; "
                    f"resume with the same dataset and data.{key}"
                    if key != "num_samples"
                    else f"loader state was saved for a dataset of {state[key]} samples, "
                    f"{self.cfg.path} has {current}; resume with the same dataset"
                )
        self.close()
        self._state = {"epoch": state["epoch"], "cursor": state["cursor"], "waiting": state["waiting"]}


def build_loader(cfg: DataConfig, rank: int, world_size: int) -> LatentLoader:
    """The training loader of one rank; see `LatentLoader` and the module docstring."""
    return LatentLoader(cfg, rank, world_size)


def build_validation_loader(cfg: DataConfig, rank: int, world_size: int) -> LatentLoader:
    """The held-out split (`data.val_path`), fixed order and no augmentation."""
    return LatentLoader(cfg, rank, world_size, validation=True)
