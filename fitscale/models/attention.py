"""Packed variable-length attention: every token attends only to the tokens of its own image.

Each backend computes softmax(q k^T / sqrt(d)) v per segment of `cu_seqlens` (a document mask)
and is an `AttentionBackend` registered by name in `BACKENDS`: its attention function, what it
needs from the packed batch (prepared once per forward), whether it is installed (`available()`)
and on which inputs it runs:
- `flash`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16), the fastest when installed;
  needs cu_seqlens and max_seqlen.
- `varlen`: PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16), the same
  FlashAttention kernels shipped inside PyTorch; needs cu_seqlens and max_seqlen.
- `flex`: FlexAttention (any device; compiled on CUDA); needs a block mask of the documents.
- `grouped`: exact on any device and dtype: images of equal token count gathered into one batch,
  one scaled_dot_product_attention call per distinct length (no padding, no mask); needs the
  length groups (one host read of cu_seqlens). The fast exact path on CPU.
- `reference`: scaled_dot_product_attention image by image; exact, any device and dtype; the
  simplest statement of the function, kept as the oracle the other backends are tested against.
- `padded`: the released method, kept as the baseline for benchmarks: every image occupies a
  segment of exactly `max_seqlen` tokens whose first rows*cols are real, and attention runs on
  the (B, H, N, N) batch with a dense boolean key mask; needs `sizes`.
`auto` picks the first of `AUTO_ORDER` that is installed and supports the inputs.
`select_backend` is the one place that chooses, and names what to install or set when it cannot.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from fitscale.errors import UserError

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
class DocumentMask:
    """Which tokens may attend to which in a packed sequence (each to its own segment's), in the
    form the chosen backend reads; built once per forward by `build_document_mask`."""

    cu_seqlens: torch.Tensor  # (S+1,) int32 segment boundaries
    max_seqlen: int  # longest segment
    segment_ids: torch.Tensor  # (T,) int64 segment index of every token
    backend: str  # name of the backend in BACKENDS that reads this mask
    block_mask: object | None = None  # FlexAttention BlockMask (flex)
    padded_mask: torch.Tensor | None = None  # (B, 1, N, N) bool key mask (padded)
    groups: LengthGroups | None = None  # equal-length batches (grouped)


@dataclass(frozen=True)
class AttentionBackend:
    """One way to compute attention within each segment of a packed sequence, registered by name.

    `attend(q, k, v, mask)` maps q, k, v (T, H, d) to (T, H, d); `prepare(mask, sizes)` fills in,
    once per forward, what `attend` reads beyond cu_seqlens and max_seqlen (`needs` says what, for
    documentation and errors); `available()` says whether its library is installed (`install`
    says how to get it); `cuda_half_only` backends run CUDA fp16/bf16 inputs only.
    """

    name: str
    needs: str
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DocumentMask], torch.Tensor]
    prepare: Callable[[DocumentMask, torch.Tensor | None], DocumentMask] | None = None
    available: Callable[[], bool] = lambda: True
    install: str = ""
    cuda_half_only: bool = False

    def unsupported(self, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why inputs on `device` in `dtype` cannot run here, or None when they can."""
        if self.cuda_half_only and not (device.type == "cuda" and dtype in HALF_DTYPES):
            return f"needs CUDA fp16/bf16 inputs, got {device.type} {dtype}"
        return None


BACKENDS: dict[str, AttentionBackend] = {}
AUTO_ORDER = ("flash", "varlen", "grouped")  # what `auto` tries, fastest first


def register_backend(backend: AttentionBackend) -> AttentionBackend:
    """Add `backend` to BACKENDS under its name (a later one of the same name replaces it)."""
    BACKENDS[backend.name] = backend
    return backend


def select_backend(requested: str, device: torch.device, dtype: torch.dtype) -> AttentionBackend:
    """The backend that will run inputs on `device` in `dtype`: `requested` by name, or for `auto`
    the first of AUTO_ORDER that is installed and supports them.

    Raises ValueError for a name that is not registered, RuntimeError naming what to install or
    set when the backend is not installed or cannot run these inputs.
    """
    if requested == "auto":
        for name in AUTO_ORDER:
            backend = BACKENDS[name]
            if backend.available() and backend.unsupported(device, dtype) is None:
                return backend
    backend = BACKENDS.get(requested)
    if backend is None:
        raise UserError(
            f"attn_backend={requested!r} is not an attention backend; use one of auto, {', '.join(BACKENDS)}"
        )
    if not backend.available():
        raise RuntimeError(f"attn_backend={requested!r} needs {backend.install}")
    reason = backend.unsupported(device, dtype)
    if reason is not None:
        raise RuntimeError(
            f"attn_backend={requested!r} {reason}; set model.attn_backend=auto to pick one that runs here"
        )
    return backend


def build_document_mask(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    total: int,
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    sizes: torch.Tensor | None = None,
) -> DocumentMask:
    """What every attention layer of one forward needs, built once: segment ids and what the
    backend reads (its `prepare`).

    `cu_seqlens` (S+1,) int32 boundaries from 0 to `total` tokens; `max_seqlen` the longest segment;
    `requested` a backend name or "auto", resolved for `device` and `dtype` by `select_backend`
    (ValueError or RuntimeError as there); `sizes` (S, 2) grid rows/cols, needed by the release's
    `padded` layout only. Raises ValueError for `padded` without `sizes` or with segments not all
    padded to `max_seqlen` tokens.
    """
    backend = select_backend(requested, device, dtype)
    segment_ids = segment_ids_from_cu_seqlens(cu_seqlens, total)
    mask = DocumentMask(cu_seqlens.to(torch.int32), max_seqlen, segment_ids, backend.name)
    return mask if backend.prepare is None else backend.prepare(mask, sizes)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
    """q, k, v (T, H, d) -> (T, H, d), attention restricted to each segment of the packed sequence."""
    return BACKENDS[mask.backend].attend(q, k, v, mask)


def flash_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask
) -> torch.Tensor:
    """flash-attn's `flash_attn_varlen_func` over the packed sequence (CUDA fp16/bf16), queries and
    keys sharing `mask.cu_seqlens`; (T, H, d) in and out."""
    from flash_attn import flash_attn_varlen_func

    cu, n = mask.cu_seqlens, mask.max_seqlen
    return flash_attn_varlen_func(q, k, v, cu, cu, n, n)


def torch_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask
) -> torch.Tensor:
    """PyTorch's `torch.nn.attention.varlen.varlen_attn` (the same FlashAttention kernels, CUDA
    fp16/bf16), queries and keys sharing `mask.cu_seqlens`; (T, H, d) in and out."""
    from torch.nn.attention.varlen import varlen_attn

    cu, n = mask.cu_seqlens, mask.max_seqlen
    return varlen_attn(q, k, v, cu, cu, n, n)


def reference_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask
) -> torch.Tensor:
    """Exact path: one SDPA call per segment (reads the boundaries on the host); (T, H, d) in and out."""
    bounds = mask.cu_seqlens.tolist()
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
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask
) -> torch.Tensor:
    """Exact path, one SDPA call per distinct image length over a (images, H, L, d) batch.

    The gather by `order` and the split into groups are single ops whose backward is one
    scatter and one concatenation, where slicing image by image would, in backward, write a
    full-size zero gradient per image.
    """
    groups = mask.groups
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


def flex_varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask
) -> torch.Tensor:
    """FlexAttention over the whole packed sequence with the block-sparse document mask
    `mask.block_mask`; (T, H, d) in and out."""
    from torch.nn.attention.flex_attention import flex_attention

    attend = _compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    out = attend(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=mask.block_mask)  # (1, H, T, d)
    return out[0].transpose(0, 1)  # (T, H, d)


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
    """The release's layout: every image padded to `max_seqlen` = N tokens, attention on the
    (B, H, N, N) batch with the dense key mask `mask.padded_mask`; (T, H, d) in and out, T = B N."""
    n = mask.max_seqlen
    qb, kb, vb = (t.unflatten(0, (-1, n)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask.padded_mask)  # (B, H, N, d)
    return out.transpose(1, 2).flatten(0, 1)  # (T, H, d)


def with_block_mask(mask: DocumentMask, sizes: torch.Tensor | None) -> DocumentMask:
    """`mask` with FlexAttention's block mask of its documents (flex)."""
    return replace(mask, block_mask=document_block_mask(mask.segment_ids))


def with_length_groups(mask: DocumentMask, sizes: torch.Tensor | None) -> DocumentMask:
    """`mask` with its segments grouped by length (grouped; one host read of cu_seqlens)."""
    return replace(mask, groups=length_groups(mask.cu_seqlens))


def with_padded_mask(mask: DocumentMask, sizes: torch.Tensor | None) -> DocumentMask:
    """`mask` with the (B, 1, N, N) boolean key mask of images padded to N = max_seqlen tokens, of
    which the first rows*cols (from `sizes` (B, 2)) are real (padded). ValueError without `sizes` or
    when the tokens are not B whole segments of N."""
    n, total = mask.max_seqlen, mask.segment_ids.shape[0]
    if sizes is None or total % n:
        raise ValueError("attn_backend='padded' needs sizes and every image padded to max_seqlen tokens")
    real = sizes[:, 0] * sizes[:, 1]  # (B,)
    key_valid = torch.arange(n, device=sizes.device)[None, :] < real[:, None]  # (B, N)
    return replace(mask, padded_mask=key_valid[:, None, None, :].expand(-1, 1, n, -1).contiguous())


CUDA_KERNEL_NEEDS = "cu_seqlens and max_seqlen"
for _backend in (
    AttentionBackend(
        "flash",
        CUDA_KERNEL_NEEDS,
        flash_varlen_attention,
        available=flash_attn_available,
        install="the flash-attn package: pip install 'fitscale[flash]'",
        cuda_half_only=True,
    ),
    AttentionBackend(
        "varlen",
        CUDA_KERNEL_NEEDS,
        torch_varlen_attention,
        available=torch_varlen_available,
        install="torch.nn.attention.varlen (PyTorch 2.9 or newer)",
        cuda_half_only=True,
    ),
    AttentionBackend(
        "flex", "a FlexAttention block mask of the documents", flex_varlen_attention, with_block_mask
    ),
    AttentionBackend(
        "grouped",
        "the segments grouped by length (one host read of cu_seqlens)",
        grouped_varlen_attention,
        with_length_groups,
    ),
    AttentionBackend("reference", "cu_seqlens (read on the host)", reference_varlen_attention),
    AttentionBackend(
        "padded", "sizes, and every image padded to max_seqlen tokens", padded_attention, with_padded_mask
    ),
):
    register_backend(_backend)
del _backend
