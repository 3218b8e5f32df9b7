"""The packed batch: the one contract between data, model and loss.

A batch is one flat sequence of tokens from many images with no padding between them.
Optionally a tail of padding up to a fixed token budget (static shapes for `torch.compile`)
follows the images as segments of at most `PADDING_SEGMENT_TOKENS` tokens: each attends only
to itself and never counts in the loss. The model treats them as more images (label = null
class); the loss reads only the first `num_images` segments. Short padding segments keep the
tail's attention cost linear in its length: one 7,000-token tail would cost as much attention
as some fifty 1,024-token images.

`PackedLayout` is where the segments lie and what conditions them (labels, positions,
boundaries, grid sizes); `PackedBatch` is a layout with its tokens and sample ids. Sampling holds
a layout while its tokens change every step. The attention mask that the model derives from a
layout is `fitscale.models.attention.DocumentMask`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

PADDING_SEGMENT_TOKENS = 128  # one FlashAttention tile


def padding_lengths(pad: int) -> list[int]:
    """Segment lengths of a `pad`-token padding tail: full segments, then the remainder."""
    full, rest = divmod(pad, PADDING_SEGMENT_TOKENS)
    return [PADDING_SEGMENT_TOKENS] * full + ([rest] if rest else [])


@dataclass
class PackedLayout:
    """Where the segments of a packed sequence lie and what conditions them: every input of the
    model besides the tokens x and the times t (`model(x, t, labels, pos, cu_seqlens, max_seqlen, sizes)`).

    Sampling holds one while x changes every step; a `PackedBatch` is a layout with its tokens.
    """

    labels: torch.Tensor  # (S,) int64: class labels (padding segments hold the null class)
    pos: torch.Tensor  # (T, 2) int64: (row, col) of each token in its image's patch grid
    cu_seqlens: torch.Tensor  # (S+1,) int32: segment boundaries, 0 to T
    sizes: torch.Tensor  # (S, 2) int64: grid rows and cols of each segment
    max_seqlen: int  # longest segment, computed on the host (never with `.item()` in a step)

    @property
    def num_segments(self) -> int:
        """S: real images plus padding segments."""
        return int(self.cu_seqlens.numel()) - 1

    @property
    def num_tokens(self) -> int:
        """Tokens computed, padding included."""
        return int(self.pos.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        """(S,) tokens of each segment, on cu_seqlens' device."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    def select(self, segments: list[int]) -> PackedLayout:
        """The layout of some of the segments, packed in the order given."""
        starts, lengths = self.cu_seqlens[:-1].tolist(), self.lengths.tolist()
        chosen = [lengths[i] for i in segments]
        index = torch.tensor(segments, dtype=torch.int64, device=self.labels.device)
        return PackedLayout(
            labels=self.labels[index],
            pos=torch.cat([self.pos[starts[i] : starts[i] + lengths[i]] for i in segments]),
            cu_seqlens=cu_seqlens_from_lengths(chosen).to(self.cu_seqlens.device, self.cu_seqlens.dtype),
            sizes=self.sizes[index],
            max_seqlen=max(chosen),
        )

    def doubled(self, null_class: int) -> PackedLayout:
        """The layout repeated, the copy's labels replaced by the null class (classifier-free guidance)."""
        offset = self.cu_seqlens[-1]
        return PackedLayout(
            labels=torch.cat([self.labels, torch.full_like(self.labels, null_class)]),
            pos=torch.cat([self.pos, self.pos]),
            cu_seqlens=torch.cat([self.cu_seqlens, self.cu_seqlens[1:] + offset]),
            sizes=torch.cat([self.sizes, self.sizes]),
            max_seqlen=self.max_seqlen,
        )


@dataclass
class PackedBatch(PackedLayout):
    """Many images of any size back to back in one token sequence, with no padding between them:
    a `PackedLayout` with its tokens and which images they are.

    The one contract between data, model and loss. T token rows hold S segments: the first
    `num_images` are real images (each rows*cols tokens of its patch grid, row-major), then, when the
    loader pads to a static token budget, padding segments of at most `PADDING_SEGMENT_TOKENS` tokens
    labelled with the null class and sample id -1.

    - `tokens` (T, p*p*C) float: clean latent tokens (16 values each for FiTv2: channel slowest, then
      row and column in the patch), the VAE latents already scaled (fitscale.data.vae);
    - `pos` (T, 2) int64: each token's (row, col) in its image's patch grid, from 0;
    - `cu_seqlens` (S+1,) int32: segment boundaries, 0 to T (FlashAttention varlen's layout);
    - `max_seqlen` int: the longest segment, computed on the host so that no kernel syncs for it;
    - `labels`, `sample_ids` (S,) int64 and `sizes` (S, 2) int64 (grid rows, cols) per segment.

    It replaces the release's batches of images each padded to N tokens with a mask
    (`fit/data/in1k_latent_dataset.py`); the model checks it where it enters
    (fitscale/models/inputs.py). Built by `pack_images` or the loader's workers
    (fitscale.data.materialize).
    """

    tokens: torch.Tensor  # (T, p*p*C) float: clean latent tokens, row-major per image
    sample_ids: torch.Tensor  # (S,) int64: stable source ids (-1 for padding segments)
    num_images: int  # real images: the first `num_images` segments
    flips: torch.Tensor | None = (
        None  # (S,) int64: 1 for a horizontally flipped variant (-1 padding); None: none
    )

    @property
    def num_real_tokens(self) -> int:
        """Tokens of real images (host-side; no device sync when cu_seqlens is on the CPU)."""
        return int(self.cu_seqlens[self.num_images])

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        """A copy with every tensor field on `device` (asynchronous from pinned memory by default)."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **moved)

    def pin_memory(self) -> PackedBatch:
        """A copy with every tensor field in page-locked host memory, for asynchronous copies to CUDA."""
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **pinned)


def pack_images(
    images: list[torch.Tensor],
    grids: list[tuple[int, int]],
    labels: list[int],
    sample_ids: list[int],
    token_budget: int | None = None,
    null_class: int = 1000,
) -> PackedBatch:
    """Concatenate images (each (rows*cols, p*p*C), row-major) into one PackedBatch.

    With `token_budget`, padding segments fill the sequence up to exactly that many tokens.
    """
    if not images:
        raise ValueError("pack_images needs at least one image")
    lengths = [rows * cols for rows, cols in grids]
    for index, (image, length) in enumerate(zip(images, lengths)):
        if image.shape[0] != length:
            raise ValueError(
                f"image {index} (sample id {sample_ids[index]}) has {image.shape[0]} tokens, "
                f"its grid {grids[index]} needs {length}"
            )
    positions = [grid_positions(rows, cols) for rows, cols in grids]
    total = sum(lengths)
    sizes = list(grids)
    segment_labels = list(labels)
    segment_ids = list(sample_ids)
    if token_budget is not None:
        if total > token_budget:
            raise ValueError(f"{total} tokens do not fit the token budget of {token_budget}")
        pad = token_budget - total
        if pad > 0:
            images = [*images, images[0].new_zeros(pad, images[0].shape[1])]
            for length in padding_lengths(pad):
                positions.append(grid_positions(1, length))
                lengths.append(length)
                sizes.append((1, length))
                segment_labels.append(null_class)
                segment_ids.append(-1)
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    return PackedBatch(
        tokens=torch.cat(images, 0),
        pos=torch.cat(positions, 0),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        labels=torch.tensor(segment_labels, dtype=torch.int64),
        sizes=torch.tensor(sizes, dtype=torch.int64),
        sample_ids=torch.tensor(segment_ids, dtype=torch.int64),
        num_images=len(grids),
    )


def cu_seqlens_from_lengths(lengths: Sequence[int] | np.ndarray) -> torch.Tensor:
    """Segment boundaries (S+1,) int32 on the CPU, [0, l0, l0+l1, ...], of S segment lengths
    (the `cu_seqlens` of FlashAttention's varlen interface)."""
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu_seqlens


def grid_positions(rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, 2) int64 (row, col) positions in row-major order."""
    row = torch.arange(rows).repeat_interleave(cols)
    col = torch.arange(cols).repeat(rows)
    return torch.stack([row, col], dim=1)


def padding_batch(token_budget: int, token_dim: int, null_class: int = 1000) -> PackedBatch:
    """A micro-batch of padding only (num_images = 0).

    A rank whose share of a step has fewer images than the step has micro-batches still runs
    every forward/backward that its peers run (FSDP collectives must match); its loss is zero.
    """
    lengths = padding_lengths(token_budget)
    cu_seqlens = cu_seqlens_from_lengths(lengths)
    return PackedBatch(
        tokens=torch.zeros(token_budget, token_dim),
        pos=torch.cat([grid_positions(1, length) for length in lengths]),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(lengths),
        labels=torch.full((len(lengths),), null_class, dtype=torch.int64),
        sizes=torch.tensor([[1, length] for length in lengths], dtype=torch.int64),
        sample_ids=torch.full((len(lengths),), -1, dtype=torch.int64),
        num_images=0,
    )
