"""Plan every optimizer step from sample sizes alone: order, variants, rank split, packing.

The plan is global and depends on the world size only in its last stage:
1. `SampleStream`: a seeded permutation of the eligible samples per epoch, consumed one sample
   at a time; epochs follow one another without a gap. Every random choice about a sample
   (flip, resize-vs-crop variant) is a hash of (seed, epoch, sample index), so it does not
   depend on which rank or worker reads the sample, nor on when.
2. A step takes samples from the stream: in "images" mode exactly `global_batch_size` of them;
   in "tokens" mode `world_size * micro_batches_per_step` micro-batches filled by
   `TokenPacker`, which looks ahead in the stream to fill each budget exactly.
3. Only then is the step split over ranks (and, in "images" mode, packed per rank).

So the whole state is a stream cursor plus the samples the packer holds, identical on every
rank and independent of the world size: a run resumed on the same world size replays the same
steps bit for bit, and one resumed on another world size consumes the rest of the same sample
sequence, so no image of the epoch is seen twice or skipped.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from collections import deque
from typing import NamedTuple

import numpy as np

from fitscale.data.format import COLS, CROP_COLS, CROP_ROWS, HAS_FLIP, LABEL, ROWS, SOURCE_ID
from fitscale.errors import UserError
from fitscale.seeds import sample_uniform, sample_uniforms

FLIP, CROP = 1, 2  # purposes of the per-sample hash


class PlannedImage(NamedTuple):
    """One image of a plan: which sample, which stored variant, and its token count.

    A named tuple: the planner makes one per image, and tuples are the cheapest to make.
    """

    epoch: int
    index: int  # global sample index in the dataset
    crop: bool  # the centre-crop variant instead of the resized one
    flip: bool  # the horizontally flipped tokens
    length: int  # tokens


class PlannerState(NamedTuple):
    """The planner's position, cheap enough to take after every step; `as_dict` to save it."""

    epoch: int
    cursor: int
    waiting: tuple[PlannedImage, ...]  # images the token packer holds, oldest first

    def as_dict(self) -> dict:
        """The state as plain JSON-able data for a checkpoint (waiting images as [epoch, index])."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "waiting": [[image.epoch, image.index] for image in self.waiting],
        }


class SampleCatalog:
    """The sample table seen by the planner: eligibility, sizes, and per-sample choices."""

    def __init__(
        self,
        table: np.ndarray,
        *,
        seed: int,
        flip_prob: float,
        crop_prob: float,
        min_tokens: int,
        max_tokens: int,
        token_budget: int,
        num_classes: int,
        where: str = "dataset",
    ):
        self.seed, self.flip_prob, self.crop_prob = seed, flip_prob, crop_prob
        self.lengths = table[:, ROWS] * table[:, COLS]
        self.crop_lengths = table[:, CROP_ROWS] * table[:, CROP_COLS]
        self.has_flip = table[:, HAS_FLIP].astype(bool)
        eligible = self.lengths >= min_tokens
        self.eligible = np.flatnonzero(eligible)
        self.num_skipped_small = int((~eligible).sum())
        labels = table[:, LABEL]
        bad = np.flatnonzero(eligible & ((labels < 0) | (labels >= num_classes)))
        if bad.size:
            i = int(bad[0])
            raise UserError(
                f"{where}: sample {i} (source id {int(table[i, SOURCE_ID])}) has label {int(labels[i])} "
                f"outside [0, {num_classes}) ({bad.size} such samples); set data.num_classes to the "
                "dataset's class count"
            )
        limit = min(max_tokens, token_budget)
        longest = np.maximum(self.lengths, self.crop_lengths)
        big = np.flatnonzero(eligible & (longest > limit))
        if big.size:
            i = int(big[0])
            raise UserError(
                f"{where}: sample {i} (source id {int(table[i, SOURCE_ID])}) has {int(longest[i])} tokens, "
                f"more than data.max_image_tokens={max_tokens} / data.token_budget={token_budget} "
                f"({big.size} such samples); raise those limits or rewrite the dataset at this limit"
            )

    def plan(self, epoch: int, index: int) -> PlannedImage:
        """PlannedImage of sample `index` in `epoch`: crop and flip drawn from a hash of (seed, epoch,
        index),
        so the choice is the same whatever rank or worker plans it.
        """
        crop = (
            bool(self.crop_lengths[index]) and sample_uniform(self.seed, epoch, index, CROP) < self.crop_prob
        )
        flip = bool(self.has_flip[index]) and sample_uniform(self.seed, epoch, index, FLIP) < self.flip_prob
        length = int(self.crop_lengths[index] if crop else self.lengths[index])
        return PlannedImage(epoch, index, crop, flip, length)

    def plan_many(self, epoch: int, indices: np.ndarray) -> list[PlannedImage]:
        """`plan` of many samples of one epoch, vectorised (the planner's hot path)."""
        crop = (self.crop_lengths[indices] > 0) & (
            sample_uniforms(self.seed, epoch, indices, CROP) < self.crop_prob
        )
        flip = self.has_flip[indices] & (sample_uniforms(self.seed, epoch, indices, FLIP) < self.flip_prob)
        length = np.where(crop, self.crop_lengths[indices], self.lengths[indices])
        fields = zip(itertools.repeat(epoch), indices.tolist(), crop.tolist(), flip.tolist(), length.tolist())
        return list(map(functools.partial(tuple.__new__, PlannedImage), fields))  # no Python call per image


class SampleStream:
    """Eligible samples in a seeded per-epoch order, one epoch after another.

    The next `BLOCK` plans of the order are made at once (`SampleCatalog.plan_many`); the state
    is still just (epoch, cursor).
    """

    BLOCK = 4096

    def __init__(self, catalog: SampleCatalog, seed: int, shuffle: bool):
        if catalog.eligible.size == 0:
            raise UserError("the dataset has no sample with enough tokens to train on")
        self.catalog, self.seed, self.shuffle = catalog, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, catalog.eligible
        self._block: list[PlannedImage] = []
        self._block_at = (-1, 0)  # (epoch, cursor) of the first plan in _block

    def order(self, epoch: int) -> np.ndarray:
        """The eligible sample indices in `epoch`'s order (a permutation seeded by (seed, epoch) when
        shuffling).
        """
        if self._order_epoch != epoch:
            eligible = self.catalog.eligible
            self._order = (
                np.random.default_rng([self.seed, epoch]).permutation(eligible) if self.shuffle else eligible
            )
            self._order_epoch = epoch
        return self._order

    def next(self) -> PlannedImage:
        """The next planned image; rolls over to the next epoch as the last image of one is taken."""
        epoch, order = self.epoch, self.order(self.epoch)
        first_epoch, first = self._block_at
        if first_epoch != epoch or not first <= self.cursor < first + len(self._block):
            self._block = self.catalog.plan_many(epoch, order[self.cursor : self.cursor + self.BLOCK])
            self._block_at = first_epoch, first = epoch, self.cursor
        image = self._block[self.cursor - first]
        self.cursor += 1
        if self.cursor == order.size:  # roll over now, so a finished epoch never shows as current
            self.epoch, self.cursor = self.epoch + 1, 0
        return image


class TokenPacker:
    """Fills micro-batches of `budget` tokens from a lookahead window of the stream.

    Each micro-batch starts with the oldest waiting image (no image waits forever), then takes
    the largest waiting image that still fits, until none does. With a few hundred images of
    mixed sizes waiting, the gap left is almost always filled exactly. A micro-batch lists its
    images longest first, as in images mode, so images of equal length lie back to back (the
    exact CPU attention then batches them without a gather).
    """

    def __init__(self, stream: SampleStream, budget: int, lookahead: int):
        self.stream, self.budget, self.lookahead = stream, budget, lookahead
        self._waiting: dict[int, PlannedImage] = {}  # insertion order = age
        self._by_length: dict[int, deque[int]] = {}
        self._lengths: list[int] = []  # sorted lengths with waiting images
        self._next_key = 0

    def _add(self, image: PlannedImage) -> None:
        key, self._next_key = self._next_key, self._next_key + 1
        self._waiting[key] = image
        queue = self._by_length.setdefault(image.length, deque())
        if not queue:
            bisect.insort(self._lengths, image.length)
        queue.append(key)

    def _take(self, length: int) -> PlannedImage:
        queue = self._by_length[length]
        key = queue.popleft()
        if not queue:
            self._lengths.pop(bisect.bisect_left(self._lengths, length))
        return self._waiting.pop(key)

    def _refill(self) -> None:
        while len(self._waiting) < self.lookahead:
            self._add(self.stream.next())

    def next_bin(self) -> list[PlannedImage]:
        """The next micro-batch: the oldest waiting image, then the longest waiting images that still
        fit the
        token budget, longest first.
        """
        self._refill()
        oldest = self._waiting[next(iter(self._waiting))]
        chosen = [self._take(oldest.length)]
        space = self.budget - oldest.length
        while True:
            self._refill()
            fit = bisect.bisect_right(self._lengths, space)
            if fit == 0:  # longest first, as first_fit_decreasing: equal lengths lie adjacent
                return sorted(chosen, key=lambda image: -image.length)
            image = self._take(self._lengths[fit - 1])
            chosen.append(image)
            space -= image.length

    def waiting(self) -> tuple[PlannedImage, ...]:
        """The images held back for later bins, oldest first."""
        return tuple(self._waiting.values())

    def load_waiting(self, waiting: list[list[int]]) -> None:
        """Restore the waiting images from their saved [epoch, index] pairs."""
        self._waiting.clear(), self._by_length.clear(), self._lengths.clear()
        for epoch, index in waiting:
            self._add(self.stream.catalog.plan(int(epoch), int(index)))


def split_over_ranks(images: list[PlannedImage], world_size: int) -> list[list[PlannedImage]]:
    """Longest-first assignment to the least-loaded rank: token counts per rank balanced."""
    loads = [(0, 0, rank) for rank in range(world_size)]  # (tokens, images, rank)
    shares: list[list[tuple[int, PlannedImage]]] = [[] for _ in range(world_size)]
    for position, image in sorted(enumerate(images), key=lambda pair: (-pair[1].length, pair[0])):
        tokens, count, rank = min(loads)
        loads[rank] = (tokens + image.length, count + 1, rank)
        shares[rank].append((position, image))
    return [[image for _, image in sorted(share, key=lambda pair: pair[0])] for share in shares]


def first_fit_decreasing(images: list[PlannedImage], budget: int) -> list[list[PlannedImage]]:
    """Bins of at most `budget` tokens: images in decreasing length, each into the first bin with room.

    An image longer than `budget` gets a bin of its own (callers have checked lengths beforehand).
    """
    bins: list[list[PlannedImage]] = []
    space: list[int] = []
    for image in sorted(images, key=lambda image: -image.length):
        for b, free in enumerate(space):
            if image.length <= free:
                bins[b].append(image)
                space[b] -= image.length
                break
        else:
            bins.append([image])
            space.append(budget - image.length)
    return bins


def equalise_bin_counts(per_rank: list[list[list[PlannedImage]]]) -> list[list[list[PlannedImage]]]:
    """Every rank gets the same number of micro-batches (FSDP collectives must line up).

    A rank with fewer splits its fullest-in-images micro-batch in two; a rank that runs out of
    images to split gets empty micro-batches, which the loader turns into padding-only ones.
    """
    target = max(len(bins) for bins in per_rank)
    for bins in per_rank:
        while len(bins) < target:
            splittable = [b for b in range(len(bins)) if len(bins[b]) > 1]
            if not splittable:
                bins.append([])
                continue
            b = max(splittable, key=lambda k: len(bins[k]))
            ordered = sorted(bins[b], key=lambda image: -image.length)
            bins[b], extra = ordered[0::2], ordered[1::2]
            bins.append(extra)
    return per_rank


class StepPlanner:
    """Global step plans for any world size, with a world-size-independent state."""

    def __init__(
        self,
        catalog: SampleCatalog,
        *,
        batch_mode: str,
        global_batch_size: int,
        token_budget: int,
        micro_batches_per_step: int,
        lookahead: int,
        seed: int,
        shuffle: bool,
    ):
        self.batch_mode = batch_mode
        self.global_batch_size = global_batch_size
        self.token_budget = token_budget
        self.micro_batches_per_step = micro_batches_per_step
        self.stream = SampleStream(catalog, seed, shuffle)
        self.packer = TokenPacker(self.stream, token_budget, lookahead)

    def state(self) -> dict:
        """The planner's position as plain data, for a checkpoint."""
        return self.snapshot().as_dict()

    def snapshot(self) -> PlannerState:
        """The planner's position as a PlannerState (cheap; taken after every step)."""
        return PlannerState(self.stream.epoch, self.stream.cursor, self.packer.waiting())

    def load_state(self, state: dict) -> None:
        """Resume from a `state()` dict: the epoch, the cursor and the images the packer held."""
        self.stream.epoch, self.stream.cursor = int(state["epoch"]), int(state["cursor"])
        self.packer.load_waiting(state["waiting"])

    def next_step(self, world_size: int) -> list[list[list[PlannedImage]]]:
        """Micro-batches of every rank for the next optimizer step: [rank][micro_batch][image]."""
        if self.batch_mode == "images":
            images = [self.stream.next() for _ in range(self.global_batch_size)]
            shares = split_over_ranks(images, world_size)
            return equalise_bin_counts([first_fit_decreasing(share, self.token_budget) for share in shares])
        per_rank = self.micro_batches_per_step
        bins = [self.packer.next_bin() for _ in range(world_size * per_rank)]
        return [bins[rank * per_rank : (rank + 1) * per_rank] for rank in range(world_size)]
