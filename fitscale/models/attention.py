"""Packed variable-length attention: every token attends only to the tokens of its own image.

Backends, all computing softmax(q k^T / sqrt(d)) v per segment of `cu_seqlens`:
- `flash`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16), the fastest when installed.
- `varlen`: PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16), the same
  FlashAttention kernels shipped inside PyTorch.
- `flex`: FlexAttention with a document mask (any device; compiled for speed).
- `grouped`: exact on any device and dtype: images of equal token count gathered into one batch,
  one scaled_dot_product_attention call per distinct length (no padding, no mask). The fast
  exact path on CPU, where per-call overhead and per-image slicing dominated `reference`.
- `reference`: scaled_dot_product_attention image by image; exact, any device and dtype; the
  simplest statement of the function, kept as the oracle the other backends are tested against.
- `padded`: the released method, kept as the baseline for benchmarks: every image occupies a
  segment of exactly `max_seqlen` tokens whose first rows*cols are real, and attention runs on
  the (B, H, N, N) batch with a dense boolean key mask.
`auto` picks the first of flash, varlen, grouped that supports the inputs.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def flash_attn_available() -> bool:
    """Whether the flash-attn package is importable (cached; imports nothing)."""
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def torch_varlen_available() -> bool:
    """Whether this PyTorch has `torch.nn.attention.varlen.varlen_attn` (2.9 or newer; cached)."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run for inputs on `device` in `dtype`, or a clear error why not."""
    cuda_half = device.type == "cuda" and dtype in HALF_DTYPES
    if requested == "auto":
        if cuda_half and flash_attn_available():
            return "flash"
        if cuda_half and torch_varlen_available():
            return "varlen"
        return "grouped"
    if requested == "flash":
        if not flash_attn_available():
            raise RuntimeError(
                "attn_backend='flash' needs the flash-attn package: pip install 'fitscale[flash]'"
            )
        if not cuda_half:
            raise RuntimeError(f"attn_backend='flash' needs CUDA fp16/bf16 inputs, got {device.type} {dtype}")
    if requested == "varlen":
        if not torch_varlen_available():
            raise RuntimeError("attn_backend='varlen' needs torch.nn.attention.varlen (PyTorch 2.9 or newer)")
        if not cuda_half:
            raise RuntimeError(
                f"attn_backend='varlen' needs CUDA fp16/bf16 inputs, got {device.type} {dtype}"
            )
    return requested


@dataclass
class LengthGroups:
    """Segments regrouped by token count, read once per forward so that no layer touches the host.

    `order` gathers the packed tokens so that the images of each group lie back to back, groups
    in order of first appearance; `inverse` gathers them back. Both are None when the packed order
    already has that layout (every image the same length, or equal lengths adjacent).
    """

    shapes: list[tuple[int, int]]  # (images, tokens per image) of each group, in gathered order
    order: torch.Tensor | None  # (T,) int64
    inverse: torch.Tensor | None  # (T,) int64


def length_groups(cu_seqlens: torch.Tensor) -> LengthGroups:
    """Group the non-empty segments of `cu_seqlens` by length (one host read of the boundaries)."""
    bounds = cu_seqlens.tolist()
    members: dict[int, list[int]] = {}  # length -> start of each of its segments, in packed order
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            members.setdefault(end - start, []).append(start)
    shapes = [(len(starts), length) for length, starts in members.items()]
    starts = [start for group in members.values() for start in group]
    lengths = [length for length, group in members.items() for _ in group]
    if starts == sorted(starts):  # groups already contiguous and in packed order
        return LengthGroups(shapes, None, None)
    device = cu_seqlens.device
    starts_t = torch.tensor(starts, device=device)  # (S,) gathered order
    lengths_t = torch.tensor(lengths, device=device)  # (S,)
    total = sum(lengths)
    offsets = torch.cumsum(lengths_t, 0) - lengths_t  # (S,) where each segment lands
    within = torch.arange(total, device=device) - torch.repeat_interleave(
        offsets, lengths_t, output_size=total
    )
    order = torch.repeat_interleave(starts_t, lengths_t, output_size=total) + within  # (T,)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(total, device=device)
    return LengthGroups(shapes, order, inverse)


@dataclass
class PackedSequence:
    """What attention needs to know about a packed batch, computed once per forward."""

    cu_seqlens: torch.Tensor  # (S+1,) int32
    max_seqlen: int
    segment_ids: torch.Tensor  # (T,) image index of every token
    backend: str  # resolved backend name
    block_mask: object | None = None  # FlexAttention BlockMask when backend == "flex"
    padded_mask: torch.Tensor | None = None  # (B, 1, N, N) bool when backend == "padded"
    groups: LengthGroups | None = None  # equal-length batches when backend == "grouped"


def build_packed_sequence(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    total: int,
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    sizes: torch.Tensor | None = None,
) -> PackedSequence:
    """What every attention layer of one forward needs, built once: segment ids and the backend's mask
    or groups.

    `cu_seqlens` (S+1,) int32 boundaries from 0 to `total` tokens; `max_seqlen` the longest segment;
    `requested` a backend name or "auto", resolved for `device` and `dtype` by `resolve_backend`
    (RuntimeError when that backend cannot run there); `sizes` (S, 2) grid rows/cols, needed by the
    release's `padded` layout only. Raises ValueError for `padded` without `sizes` or with segments
    not all padded to `max_seqlen` tokens.
    """
    backend = resolve_backend(requested, device, dtype)
    segment_ids = segment_ids_from_cu_seqlens(cu_seqlens, total)
    block_mask = document_block_mask(segment_ids) if backend == "flex" else None
    groups = length_groups(cu_seqlens) if backend == "grouped" else None
    padded_mask = None
    if backend == "padded":
        if sizes is None or total % max_seqlen:
            raise ValueError("attn_backend='padded' needs sizes and every image padded to max_seqlen tokens")
        real = sizes[:, 0] * sizes[:, 1]  # (B,)
        key_valid = torch.arange(max_seqlen, device=device)[None, :] < real[:, None]  # (B, N)
        padded_mask = key_valid[:, None, None, :].expand(-1, 1, max_seqlen, -1).contiguous()  # (B, 1, N, N)
    return PackedSequence(
        cu_seqlens.to(torch.int32), max_seqlen, segment_ids, backend, block_mask, padded_mask, groups
    )


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packed: PackedSequence
) -> torch.Tensor:
    """q, k, v (T, H, d) -> (T, H, d), attention restricted to each image of the packed sequence."""
    if packed.backend == "flash":
        from flash_attn import flash_attn_varlen_func

        cu, n = packed.cu_seqlens, packed.max_seqlen
        return flash_attn_varlen_func(q, k, v, cu, cu, n, n)
    if packed.backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        cu, n = packed.cu_seqlens, packed.max_seqlen
        return varlen_attn(q, k, v, cu, cu, n, n)
    if packed.backend == "flex":
        return flex_varlen_attention(q, k, v, packed.block_mask)
    if packed.backend == "grouped":
        return grouped_varlen_attention(q, k, v, packed.groups)
    if packed.backend == "padded":
        n = packed.max_seqlen
        qb, kb, vb = (t.unflatten(0, (-1, n)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=packed.padded_mask)  # (B, H, N, d)
        return out.transpose(1, 2).flatten(0, 1)  # (T, H, d)
    return reference_varlen_attention(q, k, v, packed.cu_seqlens)


def reference_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor
) -> torch.Tensor:
    """Exact path: one SDPA call per segment (reads the boundaries on the host)."""
    bounds = cu_seqlens.tolist()
    outputs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qi, ki, vi = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # (1, H, L, d)
        out = F.scaled_dot_product_attention(qi, ki, vi)  # (1, H, L, d)
        outputs.append(out[0].transpose(0, 1))  # (L, H, d)
    return torch.cat(outputs, dim=0)


@torch.compiler.disable  # shapes vary per batch: run eagerly between compiled regions
def grouped_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: LengthGroups
) -> torch.Tensor:
    """Exact path, one SDPA call per distinct image length over a (images, H, L, d) batch.

    The gather by `order` and the split into groups are single ops whose backward is one
    scatter and one concatenation, where slicing image by image would, in backward, write a
    full-size zero gradient per image.
    """
    if groups.order is not None:
        q, k, v = (t.index_select(0, groups.order) for t in (q, k, v))  # (T', H, d) grouped order
    sizes = [count * length for count, length in groups.shapes]
    outputs = []
    for (count, length), qg, kg, vg in zip(groups.shapes, q.split(sizes), k.split(sizes), v.split(sizes)):
        qb, kb, vb = (t.unflatten(0, (count, length)).transpose(1, 2) for t in (qg, kg, vg))  # (n, H, L, d)
        out = F.scaled_dot_product_attention(qb, kb, vb)  # (n, H, L, d)
        outputs.append(out.transpose(1, 2).flatten(0, 1))  # (n*L, H, d)
    out = torch.cat(outputs, dim=0)  # (T', H, d)
    return out if groups.inverse is None else out.index_select(0, groups.inverse)  # (T, H, d)


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """(T,) segment index of every token, without a host synchronisation."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]  # (S,)
    segments = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(segments, lengths, output_size=total)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def document_block_mask(segment_ids: torch.Tensor):
    """A FlexAttention BlockMask letting each token see only the tokens of its own image."""
    from torch.nn.attention.flex_attention import create_block_mask

    total = segment_ids.shape[0]

    def same_image(batch, head, q_index, kv_index):
        return segment_ids[q_index] == segment_ids[kv_index]

    return create_block_mask(same_image, None, None, total, total, device=segment_ids.device)


def flex_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    """FlexAttention over the whole packed sequence with a block-sparse document mask."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    out = attend(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=block_mask)  # (1, H, T, d)
    return out[0].transpose(0, 1)  # (T, H, d)
