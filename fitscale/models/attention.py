"""Packed variable-length attention: every token attends only to the tokens of its own image.

Each backend computes softmax(q k^T / sqrt(d)) v per segment of `cu_seqlens` (a document mask)
and is a small class registered by name in `BACKENDS`, saying what it needs from the packed
batch, whether it is installed (`available()`) and on which inputs it runs:
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
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

HALF_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def torch_varlen_available() -> bool:
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


class AttentionBackend:
    """One way to compute attention within each segment of a packed sequence.

    A subclass sets `name` and `needs`, implements `attend`, and may override `available`
    (its library installed; `install` says how to get it), `unsupported` (why these inputs
    cannot run) and `prepare` (fill in what it reads from the mask, once per forward).
    """

    name: ClassVar[str]
    needs: ClassVar[str]  # what it reads from the packed batch
    install: ClassVar[str] = ""  # what to install when `available()` is False
    cuda_half_only: ClassVar[bool] = False

    @classmethod
    def available(cls) -> bool:
        return True

    @classmethod
    def unsupported(cls, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why inputs on `device` in `dtype` cannot run here, or None when they can."""
        if cls.cuda_half_only and not (device.type == "cuda" and dtype in HALF_DTYPES):
            return f"needs CUDA fp16/bf16 inputs, got {device.type} {dtype}"
        return None

    @classmethod
    def prepare(cls, mask: DocumentMask, sizes: torch.Tensor | None) -> DocumentMask:
        return mask

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
        """q, k, v (T, H, d) -> (T, H, d)."""
        raise NotImplementedError


BACKENDS: dict[str, type[AttentionBackend]] = {}
AUTO_ORDER = ("flash", "varlen", "grouped")  # what `auto` tries, fastest first


def register_backend(backend: type[AttentionBackend]) -> type[AttentionBackend]:
    """Add `backend` to BACKENDS under its name (a class decorator)."""
    BACKENDS[backend.name] = backend
    return backend


class CuSeqlensKernelBackend(AttentionBackend):
    """A FlashAttention varlen kernel `f(q, k, v, cu_q, cu_k, max_q, max_k)` over the whole
    packed sequence, queries and keys sharing one `cu_seqlens` (CUDA, fp16/bf16)."""

    needs = "cu_seqlens and max_seqlen"
    cuda_half_only = True

    @staticmethod
    def kernel():
        raise NotImplementedError

    @classmethod
    def attend(cls, q, k, v, mask):
        cu, n = mask.cu_seqlens, mask.max_seqlen
        return cls.kernel()(q, k, v, cu, cu, n, n)


@register_backend
class FlashBackend(CuSeqlensKernelBackend):
    name = "flash"
    install = "the flash-attn package: pip install 'fitscale[flash]'"

    @classmethod
    def available(cls) -> bool:
        return flash_attn_available()

    @staticmethod
    def kernel():
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func


@register_backend
class TorchVarlenBackend(CuSeqlensKernelBackend):
    name = "varlen"
    install = "torch.nn.attention.varlen (PyTorch 2.9 or newer)"

    @classmethod
    def available(cls) -> bool:
        return torch_varlen_available()

    @staticmethod
    def kernel():
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn


@register_backend
class FlexBackend(AttentionBackend):
    name = "flex"
    needs = "a FlexAttention block mask of the documents"

    @classmethod
    def prepare(cls, mask, sizes):
        return replace(mask, block_mask=document_block_mask(mask.segment_ids))

    @staticmethod
    def attend(q, k, v, mask):
        return flex_varlen_attention(q, k, v, mask.block_mask)


@register_backend
class GroupedBackend(AttentionBackend):
    name = "grouped"
    needs = "the segments grouped by length (one host read of cu_seqlens)"

    @classmethod
    def prepare(cls, mask, sizes):
        return replace(mask, groups=length_groups(mask.cu_seqlens))

    @staticmethod
    def attend(q, k, v, mask):
        return grouped_varlen_attention(q, k, v, mask.groups)


@register_backend
class ReferenceBackend(AttentionBackend):
    name = "reference"
    needs = "cu_seqlens (read on the host)"

    @staticmethod
    def attend(q, k, v, mask):
        return reference_varlen_attention(q, k, v, mask.cu_seqlens)


@register_backend
class PaddedBackend(AttentionBackend):
    name = "padded"
    needs = "sizes, and every image padded to max_seqlen tokens"

    @classmethod
    def prepare(cls, mask, sizes):
        n, total = mask.max_seqlen, mask.segment_ids.shape[0]
        if sizes is None or total % n:
            raise ValueError("attn_backend='padded' needs sizes and every image padded to max_seqlen tokens")
        real = sizes[:, 0] * sizes[:, 1]  # (B,)
        key_valid = torch.arange(n, device=sizes.device)[None, :] < real[:, None]  # (B, N)
        return replace(mask, padded_mask=key_valid[:, None, None, :].expand(-1, 1, n, -1).contiguous())

    @staticmethod
    def attend(q, k, v, mask):
        n = mask.max_seqlen
        qb, kb, vb = (t.unflatten(0, (-1, n)).transpose(1, 2) for t in (q, k, v))  # (B, H, N, d)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask.padded_mask)  # (B, H, N, d)
        return out.transpose(1, 2).flatten(0, 1)  # (T, H, d)


def select_backend(requested: str, device: torch.device, dtype: torch.dtype) -> type[AttentionBackend]:
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
        raise ValueError(
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
    """The mask of a packed sequence of `total` tokens for the backend `select_backend` picks
    (errors as there); `sizes` (S, 2) is needed by `padded` only."""
    backend = select_backend(requested, device, dtype)
    segment_ids = segment_ids_from_cu_seqlens(cu_seqlens, total)
    mask = DocumentMask(cu_seqlens.to(torch.int32), max_seqlen, segment_ids, backend.name)
    return backend.prepare(mask, sizes)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: DocumentMask) -> torch.Tensor:
    """q, k, v (T, H, d) -> (T, H, d), attention restricted to each segment of the packed sequence."""
    return BACKENDS[mask.backend].attend(q, k, v, mask)


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
