"""Packed variable-length attention: every token attends only to the tokens of its own image.

Backends, all computing softmax(q k^T / sqrt(d)) v per segment of `cu_seqlens`:
- `flash`: flash-attn's `flash_attn_varlen_func` (CUDA, fp16/bf16), the fastest when installed.
- `varlen`: PyTorch's `torch.nn.attention.varlen.varlen_attn` (CUDA, fp16/bf16), the same
  FlashAttention kernels shipped inside PyTorch.
- `flex`: FlexAttention with a document mask (any device; compiled for speed).
- `reference`: scaled_dot_product_attention image by image; exact, any device and dtype.
- `padded`: the released method, kept as the baseline for benchmarks: every image occupies a
  segment of exactly `max_seqlen` tokens whose first rows*cols are real, and attention runs on
  the (B, H, N, N) batch with a dense boolean key mask.
`auto` picks the first of flash, varlen, reference that supports the inputs.
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
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def torch_varlen_available() -> bool:
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
        return "reference"
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
class PackedSequence:
    """What attention needs to know about a packed batch, computed once per forward."""

    cu_seqlens: torch.Tensor  # (S+1,) int32
    max_seqlen: int
    segment_ids: torch.Tensor  # (T,) image index of every token
    backend: str  # resolved backend name
    block_mask: object | None = None  # FlexAttention BlockMask when backend == "flex"
    padded_mask: torch.Tensor | None = None  # (B, 1, N, N) bool when backend == "padded"


def build_packed_sequence(
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    total: int,
    requested: str,
    device: torch.device,
    dtype: torch.dtype,
    sizes: torch.Tensor | None = None,
) -> PackedSequence:
    backend = resolve_backend(requested, device, dtype)
    segment_ids = segment_ids_from_cu_seqlens(cu_seqlens, total)
    block_mask = document_block_mask(segment_ids) if backend == "flex" else None
    padded_mask = None
    if backend == "padded":
        if sizes is None or total % max_seqlen:
            raise ValueError("attn_backend='padded' needs sizes and every image padded to max_seqlen tokens")
        real = sizes[:, 0] * sizes[:, 1]  # (B,)
        key_valid = torch.arange(max_seqlen, device=device)[None, :] < real[:, None]  # (B, N)
        padded_mask = key_valid[:, None, None, :].expand(-1, 1, max_seqlen, -1).contiguous()  # (B, 1, N, N)
    return PackedSequence(
        cu_seqlens.to(torch.int32), max_seqlen, segment_ids, backend, block_mask, padded_mask
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
