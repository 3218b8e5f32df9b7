"""The training loader: MDS shards -> planned, packed micro-batches, one step at a time.

Pipeline (torchdata nodes, each a stateful piece):
    PlanSource      this rank's step plans, from the global `StepPlanner` (metadata only); the
                    plans stay in this process, workers get (sample, crop, flip) arrays
    ParallelMapper  worker processes read the planned token arrays straight from the shards
                    (`ShardReader`: the local folder, or a remote dataset cached locally by a
                    `StreamingDataset`) and pack the step (`MaterializeStep`), which comes back
                    through shared memory
    PinMemory       optional, when CUDA is present
    Prefetcher      keeps steps ready ahead of the trainer
`LatentLoader` pairs each packed step with its plan and yields a `StepBatch`.

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fitscale.compat import shutdown_node_workers
from fitscale.config.data import DataConfig
from fitscale.data.batch import PackedBatch
from fitscale.data.cache import open_streaming_dataset
from fitscale.data.format import (
    META_FILE,
    SAMPLES_FILE,
    TOKEN_DIM,
    check_local_shards,
    read_index,
    read_meta,
    read_sample_table,
    token_dim_of,
)
from fitscale.data.integrity import check_side_files
from fitscale.data.materialize import MaterializeStep, remove_leftovers, shared_prefix
from fitscale.data.packing import PlannedImage, PlannerState, SampleCatalog, StepPlanner
from fitscale.data.reader import ShardReader
from fitscale.errors import UserError

STATE_VERSION = 1
ITEM_IMAGES = 256  # a worker's item of work holds whole steps with at least this many images
ITEM_STEPS = 16  # ... and at most this many steps (a rank may get no image in a step)


@dataclass
class StepBatch:
    """Everything one rank computes in one optimizer step."""

    micro_batches: list[PackedBatch]
    global_num_images: int | None  # known in "images" mode; None in "tokens" mode (all-reduce it)


@dataclass
class StepPlan:
    """This rank's share of one optimizer step, as planned in the main process."""

    micro_batches: list[list[PlannedImage]]
    state: PlannerState  # after this step
    global_num_images: int | None

    def work(self) -> list[np.ndarray]:
        """What a worker needs to build the step: per micro-batch (N, 3) int64 of sample, crop, flip."""
        return [
            np.array([image[1:4] for image in images], dtype=np.int64).reshape(-1, 3)
            for images in self.micro_batches
        ]


def fetch_remote_file(remote: str, local: Path, timeout: float, retries: int = 5) -> None:
    """Download `remote` to `local` unless present; a per-process temporary name avoids races.
    Retried `retries` times with Streaming's backoff (1, 2, 4 ... s), as shard downloads are."""
    if local.exists():
        return
    from streaming.base.storage.download import CloudDownloader
    from streaming.base.util import retry

    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f"{local.name}.{os.getpid()}.part")
    retry(num_attempts=retries + 1)(CloudDownloader.direct_download)(remote, str(tmp), timeout)
    os.replace(tmp, local)


def dataset_meta(cfg: DataConfig) -> dict:
    """The training dataset's fitscale.json (fetched into the cache `data.path` first for a remote
    dataset, as the loader does); read_meta's errors for a folder that is not a finished dataset."""
    path = Path(cfg.path)
    if cfg.remote is not None:
        remote = f"{cfg.remote.rstrip('/')}/{META_FILE}"
        fetch_remote_file(remote, path / META_FILE, cfg.download_timeout, cfg.download_retry)
    return read_meta(path)


def open_shard_reader(
    path: Path, cfg: DataConfig, field: str = "data.path", token_dim: int = TOKEN_DIM
) -> ShardReader:
    """Direct reads of the shards in `path` (tokens `token_dim` wide), which a StreamingDataset fills
    when it is a cache.

    A local dataset of uncompressed shards needs no StreamingDataset at all (importing Streaming
    alone takes seconds); a remote one, or compressed shards not yet unpacked, does.
    """
    if cfg.remote is not None:
        cache = open_streaming_dataset(path, cfg.remote, cfg, field)
        return ShardReader(path, read_index(path), cache, cfg.verify_shards, token_dim)
    check_local_shards(path)  # names a missing or truncated shard before training starts
    index = read_index(path)
    packed = any(
        shard.get("zip_data") and not (path / shard["raw_data"]["basename"]).exists()
        for shard in index["shards"]
    )
    cache = open_streaming_dataset(path, None, cfg, field) if packed else None
    return ShardReader(path, index, cache, cfg.verify_shards, token_dim)


def _plan_source_class():
    import torchdata.nodes as tn

    class PlanSource(tn.BaseNode):
        """This rank's work, a few steps at a time; its state is the global planner state.

        The plans themselves (with the planner state after each step) stay in this process, in
        `planned`, in the order of their work items; workers receive only `StepPlan.work`, and
        the pipeline keeps that order (`in_order=True`), so the consumer pairs each item's
        packed micro-batches with its plans. An item holds whole steps, at least
        `ITEM_IMAGES` images of them (at most `ITEM_STEPS` steps): the costs paid per item
        (messages, a step file, thread hand-offs) then spread over as many images when a step
        is small, as in "tokens" mode or with few images per rank.
        """

        def __init__(self, planner: StepPlanner, rank: int, world_size: int):
            super().__init__()
            self.planner, self.rank, self.world_size = planner, rank, world_size
            self.planned: deque[list[StepPlan]] = deque()

        def reset(self, initial_state: dict | None = None) -> None:
            super().reset(initial_state)
            if initial_state is not None:
                self.planner.load_state(initial_state)
            self.planned.clear()

        def next(self) -> list[np.ndarray]:
            plans, work, images = [], [], 0
            while images < ITEM_IMAGES and len(plans) < ITEM_STEPS:
                plans.append(self.next_plan())
                work += plans[-1].work()
                images += sum(len(micro_batch) for micro_batch in plans[-1].micro_batches)
            self.planned.append(plans)
            return work

        def next_plan(self) -> StepPlan:
            per_rank = self.planner.next_step(self.world_size)
            num_images = sum(len(b) for bins in per_rank for b in bins)
            global_images = num_images if self.planner.batch_mode == "images" else None
            return StepPlan(per_rank[self.rank], self.planner.snapshot(), global_images)

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
                fetch_remote_file(f"{remote}/{name}", path / name, cfg.download_timeout, cfg.download_retry)
        self.meta = read_meta(path)
        field = "data.val_path" if validation else "data.path"
        self.reader = open_shard_reader(path, cfg, field, token_dim_of(self.meta))
        check_side_files(path, self.meta)  # index.json and samples.npy are this dataset's
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
        self._state: PlannerState | dict = self._new_planner().snapshot()
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
        return int(self._state["epoch"] if isinstance(self._state, dict) else self._state.epoch)

    def _position(self) -> dict:
        """The planner state after the last step yielded, as saved."""
        return self._state.as_dict() if isinstance(self._state, PlannerState) else self._state

    def _build_pipeline(self) -> list:
        """The torchdata nodes from source to output; the last one is iterated.

        The nodes take no snapshots of their sources (`snapshot_frequency=0`): the loader's own
        state is the planner state carried by the plans, and a per-item snapshot would copy the
        packer's waiting list for every micro-batch.
        """
        import torchdata.nodes as tn

        cfg = self.cfg
        self._source = source = _plan_source_class()(self._new_planner(), self.rank, self.world_size)
        source.reset(self._position())
        self._prefix = shared_prefix(cfg)
        materialize = MaterializeStep(self.reader, self.table, cfg, str(cfg.path), self._prefix)
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
            shutdown_node_workers(node)
        self._nodes = []
        remove_leftovers(getattr(self, "_prefix", None))

    def __iter__(self):
        self.close()
        self._nodes = self._build_pipeline()
        try:
            for micro_batches in _worker_errors_unwrapped(self._nodes[-1]):
                plans = self._source.planned.popleft()
                planned = [len(images) for plan in plans for images in plan.micro_batches]
                if [mb.num_images for mb in micro_batches] != planned:
                    raise RuntimeError("loader pipeline out of order: packed steps do not match their plans")
                for plan in plans:
                    count = len(plan.micro_batches)
                    step, micro_batches = micro_batches[:count], micro_batches[count:]
                    self._state = plan.state
                    yield StepBatch(step, plan.global_num_images)
        finally:
            self.close()

    def state_dict(self) -> dict:
        """The position after the last step yielded; the same on every rank, any world size."""
        cfg, position = self.cfg, self._position()
        return {
            "version": STATE_VERSION,
            "num_samples": self.num_samples,
            "seed": cfg.seed,
            "shuffle": cfg.shuffle,
            "epoch": int(position["epoch"]),
            "cursor": int(position["cursor"]),
            "waiting": [list(map(int, pair)) for pair in position["waiting"]],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`, saved on any world size (see the module docstring)."""
        if state.get("version") != STATE_VERSION:
            raise UserError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key in ("num_samples", "seed", "shuffle"):
            current = self.num_samples if key == "num_samples" else getattr(self.cfg, key)
            if state[key] != current:
                raise UserError(
                    f"loader state was saved with {key}={state[key]!r} but this run has {current!r}; "
                    f"resume with the same dataset and data.{key}"
                    if key != "num_samples"
                    else f"loader state was saved for a dataset of {state[key]} samples, "
                    f"{self.cfg.path} has {current}; resume with the same dataset"
                )
        self.close()
        self._state = {"epoch": state["epoch"], "cursor": state["cursor"], "waiting": state["waiting"]}


def _worker_errors_unwrapped(iterable):
    """Items of `iterable`; a data error (ValueError) raised in a worker comes back with its own
    one-line message, not torchdata's "Caught ... Original Traceback ..." wrapping of it."""
    try:
        yield from iterable
    except ValueError as error:
        text = str(error)
        marker = f"{type(error).__name__}: "
        if not text.startswith("Caught ") or marker not in text:
            raise
        raise type(error)(text.rsplit(marker, 1)[1].strip()) from error


def build_loader(cfg: DataConfig, rank: int, world_size: int) -> LatentLoader:
    """The training loader of one rank; see `LatentLoader` and the module docstring."""
    return LatentLoader(cfg, rank, world_size)


def build_validation_loader(cfg: DataConfig, rank: int, world_size: int) -> LatentLoader:
    """The held-out split (`data.val_path`), fixed order and no augmentation."""
    return LatentLoader(cfg, rank, world_size, validation=True)
