"""Which images a sampling run makes, how they share forward passes, and their starting noise.

An image is a `SampleItem`: its global index (its file names), its index among the images of its
size, class and grid in tokens. Its label and noise are functions of (seed, size, index within the
size) only, so an image of size S is the same whether S is sampled alone or after other sizes, and
on any number of ranks. Items are packed into batches up to a token budget exactly like training
batches (fitscale.data.batch), so any mix of sizes and aspect ratios shares one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fitscale.data.batch import PackedLayout, cu_seqlens_from_lengths, grid_positions
from fitscale.data.format import unpatchify
from fitscale.data.vae import PIXELS_PER_TOKEN
from fitscale.errors import UserError
from fitscale.seeds import image_seed


@dataclass
class SampleItem:
    """One image to generate: its global index (names its files), class, grid in tokens, and its
    index among the images of its size (with the seed and size, it keys its noise; defaults to
    `index`)."""

    index: int
    label: int
    rows: int
    cols: int
    pixels_per_token: int = PIXELS_PER_TOKEN  # autoencoder downsampling x patch size
    index_in_size: int | None = None

    def __post_init__(self) -> None:
        if self.index_in_size is None:
            self.index_in_size = self.index

    @property
    def tokens(self) -> int:
        """Tokens of the image: rows * cols of its patch grid."""
        return self.rows * self.cols

    @property
    def height(self) -> int:
        """Height in pixels after VAE decoding."""
        return self.rows * self.pixels_per_token

    @property
    def width(self) -> int:
        """Width in pixels after VAE decoding."""
        return self.cols * self.pixels_per_token


def plan_items(
    sizes: list[tuple[int, int]],
    num_per_size: int,
    num_classes: int,
    labels: list[int] | None = None,
    seed: int = 0,
    pixels_per_token: int = PIXELS_PER_TOKEN,
) -> list[SampleItem]:
    """The images of a run: `num_per_size` of each (height, width) in pixels, in the order given;
    a token covers `pixels_per_token` pixels a side (16 for SD-VAE latents, 32 for DC-AE f32).

    Labels are `labels` cycled by the index within the size, or drawn from a generator keyed by
    (seed, height, width) in that index order: an image's label does not depend on the sizes
    listed before it (a size listed twice continues its count). Raises UserError naming the flag of
    a bad size, count or label.
    """
    step = pixels_per_token
    if num_per_size < 1:
        raise UserError(f"--num-per-size {num_per_size}: must be >= 1")
    for height, width in sizes:
        if height % step or width % step or min(height, width) <= 0:
            raise UserError(
                f"size {height}x{width}: height and width must be positive multiples of {step} pixels"
            )
    for label in labels or []:
        if not 0 <= label < num_classes:
            raise UserError(f"--labels: class {label} is outside [0, {num_classes}) for this model")
    rngs: dict[tuple[int, int], np.random.Generator] = {}
    counts: dict[tuple[int, int], int] = {}
    items = []
    for height, width in sizes:
        rng = rngs.setdefault((height, width), np.random.default_rng([seed, 7, height, width]))
        for _ in range(num_per_size):
            within = counts.get((height, width), 0)
            counts[(height, width)] = within + 1
            label = labels[within % len(labels)] if labels else int(rng.integers(num_classes))
            items.append(
                SampleItem(len(items), label, height // step, width // step, step, index_in_size=within)
            )
    return items


def batches_by_budget(items: list[SampleItem], token_budget: int, guided: bool) -> list[list[SampleItem]]:
    """Consecutive items grouped so each forward holds at most `token_budget` tokens (guidance
    doubles an image's tokens). Raises ValueError for an image that alone exceeds the budget."""
    factor = 2 if guided else 1
    groups: list[list[SampleItem]] = []
    used = 0
    for item in items:
        need = item.tokens * factor
        if need > token_budget:
            raise UserError(
                f"a {item.height}x{item.width} image needs {need} tokens per forward, over --token-budget "
                f"{token_budget}; raise the budget"
            )
        if not groups or used + need > token_budget:
            groups.append([])
            used = 0
        groups[-1].append(item)
        used += need
    return groups


def noise_seed(item: SampleItem, seed: int, stream: int) -> int:
    """The torch.Generator seed of `item`'s noise stream `stream` (0: initial noise, k: SDE step
    k - 1): a function of (seed, height, width, index within the size, stream) only."""
    size_seed = image_seed(seed, item.rows, item.cols)
    return image_seed(size_seed, stream, item.index_in_size)


def initial_noise(item: SampleItem, token_dim: int, seed: int) -> torch.Tensor:
    """(rows*cols, p*p*C) standard normal noise that depends only on (seed, size, index within size)."""
    generator = torch.Generator().manual_seed(noise_seed(item, seed, 0))
    return torch.randn(item.tokens, token_dim, generator=generator)


def step_noise(items: list[SampleItem], token_dim: int, seed: int, step: int) -> torch.Tensor:
    """(T, p*p*C) standard normal noise of SDE step `step` (0, 1, ...) for packed `items`, each
    image's drawn from (seed, size, index within size, step + 1) on the CPU: independent of batch,
    rank, device and the other sizes of the run."""
    chunks = []
    for item in items:
        generator = torch.Generator().manual_seed(noise_seed(item, seed, step + 1))
        chunks.append(torch.randn(item.tokens, token_dim, generator=generator))
    return torch.cat(chunks)


def pack_layout(items: list[SampleItem], device: torch.device) -> PackedLayout:
    """The packed-batch layout (labels, positions, boundaries, grid sizes) of `items`, in order."""
    lengths = [item.tokens for item in items]
    return PackedLayout(
        labels=torch.tensor([item.label for item in items], dtype=torch.int64, device=device),
        pos=torch.cat([grid_positions(item.rows, item.cols) for item in items]).to(device),
        cu_seqlens=cu_seqlens_from_lengths(lengths).to(device),
        sizes=torch.tensor([[item.rows, item.cols] for item in items], dtype=torch.int64, device=device),
        max_seqlen=max(lengths),
    )


def split_latents(tokens: torch.Tensor, items: list[SampleItem], channels: int) -> list[torch.Tensor]:
    """Packed tokens (T, C*p*p) of `items` -> one latent (C, rows*p, cols*p) per item, float32
    (float64 for float64 tokens)."""
    out = []
    start = 0
    if tokens.dtype != torch.float64:
        tokens = tokens.float()
    for item in items:
        chunk = tokens[start : start + item.tokens].cpu().numpy()
        out.append(torch.from_numpy(np.ascontiguousarray(unpatchify(chunk, item.rows, item.cols, channels))))
        start += item.tokens
    return out
