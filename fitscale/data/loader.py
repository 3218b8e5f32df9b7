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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fitscale.config.data import DataConfig
from fitscale.data.batch import PackedBatch, pack_images, padding_batch
from fitscale.data.format import (
    META_FILE,
    SAMPLES_FILE,
    TOKEN_DIM,
    check_local_shards,
    read_meta,
    read_sample_table,
)
from fitscale.data.packing import PlannedImage, SampleCatalog, StepPlanner

STATE_VERSION = 1


@dataclass
class StepBatch:
    """Everything one rank computes in one optimizer step."""

    micro_batches: list[PackedBatch]
    global_num_images: int | None  # known in "images" mode; None in "tokens" mode (all-reduce it)


@dataclass
class MicroBatchPlan:
    step_state: dict | None  # planner state after this step, on the step's last micro-batch only
    position: int  # index of this micro-batch in its step
    count: int  # micro-batches in the step
    images: list[PlannedImage]
    global_num_images: int | None


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
    """A StreamingDataset used for random access by global sample index."""
    from streaming import StreamingDataset

    if remote is None:
        check_local_shards(path)  # names a missing or truncated shard before training starts
    return StreamingDataset(
        local=path,
        remote=remote,
        shuffle=False,
        download_timeout=cfg.download_timeout,
        cache_limit=cfg.cache_limit,
        batch_size=1,
    )


class MaterializeMicroBatch:
    """Reads the planned samples and packs them; runs inside the worker processes."""

    def __init__(self, dataset, cfg: DataConfig, where: str):
        self.dataset, self.where = dataset, where
        self.pad_to = cfg.token_budget if cfg.pad_to_budget else None
        self.null_class = cfg.num_classes

    def shard_name(self, index: int) -> str:
        shard_id, _ = self.dataset.spanner[index]
        return self.dataset.shards[shard_id].raw_data.basename

    def read(self, image: PlannedImage) -> tuple[torch.Tensor, tuple[int, int], int, int]:
        try:
            sample = self.dataset[image.index]
        except Exception as error:
            raise ValueError(
                f"{self.where}: sample {image.index} in shard {self.shard_name(image.index)} cannot be "
                f"read ({type(error).__name__}: {error}); the shard is corrupt, rewrite the dataset"
            ) from error
        where = f"{self.where}: sample {image.index} (source {sample['source']!r}, shard {self.shard_name(image.index)})"
        variants = sample["crop"] if image.crop else sample["tokens"]
        rows, cols = (
            (sample["crop_rows"], sample["crop_cols"]) if image.crop else (sample["rows"], sample["cols"])
        )
        if variants.ndim != 3 or variants.shape[2] != TOKEN_DIM or variants.shape[1] != rows * cols:
            raise ValueError(
                f"{where}: tokens of shape {tuple(variants.shape)}, expected (V, {rows * cols}, {TOKEN_DIM}) "
                "for its grid and p*p*C; rewrite the dataset"
            )
        tokens = torch.from_numpy(np.array(variants[1 if image.flip else 0], dtype=np.float32))
        if not torch.isfinite(tokens).all():
            raise ValueError(f"{where}: latents hold NaN or inf; rewrite the dataset")
        return tokens, (int(rows), int(cols)), int(sample["label"]), int(sample["source_id"])

    def __call__(self, plan: MicroBatchPlan) -> tuple[MicroBatchPlan, PackedBatch]:
        if not plan.images:
            return plan, padding_batch(self.pad_to or 1, TOKEN_DIM, self.null_class)
        tokens, grids, labels, ids = zip(*(self.read(image) for image in plan.images))
        batch = pack_images(list(tokens), list(grids), list(labels), list(ids), self.pad_to, self.null_class)
        return plan, batch


def _plan_source_class():
    import torchdata.nodes as tn

    class PlanSource(tn.BaseNode):
        """This rank's micro-batch plans; its state is the global planner state."""

        def __init__(self, planner: StepPlanner, rank: int, world_size: int):
            super().__init__()
            self.planner, self.rank, self.world_size = planner, rank, world_size
            self._queue: list[MicroBatchPlan] = []

        def reset(self, initial_state: dict | None = None) -> None:
            super().reset(initial_state)
            if initial_state is not None:
                self.planner.load_state(initial_state)
            self._queue = []

        def next(self) -> MicroBatchPlan:
            if not self._queue:
                per_rank = self.planner.next_step(self.world_size)
                step_state = self.planner.state()
                mine = per_rank[self.rank]
                num_images = sum(len(b) for bins in per_rank for b in bins)
                global_images = num_images if self.planner.batch_mode == "images" else None
                self._queue = [
                    MicroBatchPlan(
                        step_state if k == len(mine) - 1 else None, k, len(mine), images, global_images
                    )
                    for k, images in enumerate(mine)
                ]
            return self._queue.pop(0)

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
        self.dataset = open_streaming_dataset(str(path), cfg.remote, cfg)
        table = read_sample_table(path, self.dataset.num_samples)
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
        """The torchdata nodes from source to output; the last one is iterated."""
        import torchdata.nodes as tn

        cfg = self.cfg
        source = _plan_source_class()(self._new_planner(), self.rank, self.world_size)
        source.reset(self._state)
        materialize = MaterializeMicroBatch(self.dataset, cfg, str(cfg.path))
        if cfg.num_workers > 0:
            nodes = [
                tn.ParallelMapper(
                    source, materialize, num_workers=cfg.num_workers, in_order=True, method=cfg.worker_method
                )
            ]
        else:
            nodes = [tn.Mapper(source, materialize)]
        if cfg.pin_memory and torch.cuda.is_available():
            nodes.append(tn.PinMemory(nodes[-1]))
        nodes.append(tn.Prefetcher(nodes[-1], prefetch_factor=cfg.prefetch * max(1, cfg.num_workers)))
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
        micro_batches: list[PackedBatch] = []
        try:
            for plan, batch in self._nodes[-1]:
                micro_batches.append(batch)
                if plan.position == plan.count - 1:
                    self._state = plan.step_state
                    yield StepBatch(micro_batches, plan.global_num_images)
                    micro_batches = []
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
