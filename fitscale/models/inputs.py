"""The packed-batch contract of FiT.forward, checked where a batch enters the model.

A packed batch is S segments (images, then any padding segments) laid back to back in T token
rows (fitscale.data.batch). The model needs, and `check_packed_batch` enforces:

- x (T, p*p*C) floating; pos (T, 2) integer; t (S,) floating; y (S,) integer;
  cu_seqlens (S+1,) int32; sizes (S, 2) integer or None; max_seqlen a python int or None;
  every tensor on x's device;
- cu_seqlens runs from 0 to T and never decreases (zero-length segments are allowed: static
  shapes append them); max_seqlen is at least the longest segment (FlashAttention reads it);
- each segment holds rows*cols tokens of its grid `sizes` (or none); with the released `padded`
  attention a segment holds at least rows*cols (the rest is the image's padding);
- every pos lies in its segment's grid: 0 <= row < rows, 0 <= col < cols;
- y in [0, num_classes]: num_classes is the null class (classifier-free guidance, label dropout,
  padding segments);
- t finite and >= 0 (0 = noise, 1 = clean data, FiTv2's convention). Training draws t in [0, 1]
  and the loss checks that; the model itself also answers past 1, because adaptive ODE solvers
  (torchdiffeq's initial step selection, as the release's sampling uses it) probe t0 + h0 > 1.

Dtypes, shapes and devices are tensor metadata and always checked. Values are checked for
tensors on the CPU only: reading a CUDA tensor's values would stall the step on a device sync.
The trainer therefore checks the batch on the host, where the collator built it, before copying
it to an accelerator (the values the model then sees are the same). Any violation is one
ValueError naming the field and the offending values. Without this, malformed batches fail deep in
ATen with messages that name no field, or (on CUDA) do not fail at all: rows past cu_seqlens[-1]
are silently attended by nobody and get NaN gradients.
"""

from __future__ import annotations

import numpy as np
import torch


def _fail(message: str) -> None:
    raise ValueError(f"packed batch: {message}")


def _on_cpu(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu"


def _check_meta(name: str, tensor: object, shape: tuple, kind: str, device: torch.device) -> None:
    """`shape` holds ints or None (any size); `kind` is 'float', 'int' or 'int32'."""
    if not isinstance(tensor, torch.Tensor):
        _fail(f"{name} must be a tensor, got {type(tensor).__name__}")
    if kind == "float" and not tensor.is_floating_point():
        _fail(f"{name} must be a floating tensor, got {tensor.dtype}")
    if kind == "int" and (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool):
        _fail(f"{name} must be an integer tensor, got {tensor.dtype}")
    if kind == "int32" and tensor.dtype != torch.int32:
        _fail(f"{name} must be int32 (FlashAttention's boundary type), got {tensor.dtype}")
    wanted = str(tuple("*" if size is None else size for size in shape)).replace("'", "")
    if tensor.dim() != len(shape) or any(w is not None and w != s for w, s in zip(shape, tensor.shape)):
        _fail(f"{name} must have shape {wanted}, got {tuple(tensor.shape)}")
    if tensor.device != device:
        _fail(f"{name} is on {tensor.device} but x is on {device}")


@torch.compiler.disable  # host-side checks with data-dependent branches: never traced
def check_packed_batch(
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    pos: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None,
    sizes: torch.Tensor | None,
    *,
    token_dim: int,
    num_classes: int,
    padded: bool = False,
) -> None:
    """Raise ValueError unless (x, t, y, pos, cu_seqlens, max_seqlen, sizes) is a valid packed batch.

    Shapes are as in `FiT.forward`; `num_classes` real classes (index num_classes is the null
    class); `padded` allows the released padded layout (a segment longer than its grid).
    No device synchronisation: values of non-CPU tensors are not read (see the module docstring).
    """
    if not isinstance(x, torch.Tensor):
        _fail(f"x must be a tensor, got {type(x).__name__}")
    device = x.device
    _check_meta("x", x, (None, token_dim), "float", device)
    total = x.shape[0]
    _check_meta("cu_seqlens", cu_seqlens, (None,), "int32", device)
    segments = cu_seqlens.shape[0] - 1
    if segments < 1:
        _fail(f"cu_seqlens must hold at least two boundaries (S+1 for S segments), got {cu_seqlens.shape[0]}")
    _check_meta("t", t, (segments,), "float", device)
    _check_meta("y", y, (segments,), "int", device)
    _check_meta("pos", pos, (total, 2), "int", device)
    if sizes is not None:
        _check_meta("sizes", sizes, (segments, 2), "int", device)
    if max_seqlen is not None and (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int)):
        _fail(f"max_seqlen must be a python int, got {type(max_seqlen).__name__}")

    lengths = None
    if _on_cpu(cu_seqlens):
        lengths = _check_boundaries(_host(cu_seqlens), total, max_seqlen)
    if sizes is not None and _on_cpu(sizes):
        _check_sizes(_host(sizes), lengths, padded)
    if _on_cpu(pos):
        _check_positions(_host(pos), _host(sizes) if sizes is not None and _on_cpu(sizes) else None, lengths)
    if _on_cpu(y):
        labels = _host(y)
        bad = np.flatnonzero((labels < 0) | (labels > num_classes))
        if bad.size:
            i = int(bad[0])
            _fail(
                f"y[{i}]={int(labels[i])} is not a label of this model: labels lie in [0, {num_classes}) "
                f"and {num_classes} is the null class"
            )
    if _on_cpu(t):
        times = _host(t.float())
        bad = np.flatnonzero(~(np.isfinite(times) & (times >= 0)))  # NaN fails too
        if bad.size:
            i = int(bad[0])
            _fail(f"t[{i}]={float(times[i])} must be a finite time >= 0 (0 = noise, 1 = clean data)")


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int | None = None) -> None:
    """The boundary rules of `check_packed_batch` alone: a CPU `cu_seqlens` (S+1,) must start at 0,
    never decrease and end at `total` token rows (and no segment exceed `max_seqlen`); ValueError
    naming the boundary otherwise. Values on other devices are not read (no sync). For code that
    reads the boundaries before the model does (the flow loss spreads timesteps over them)."""
    if _on_cpu(cu_seqlens) and cu_seqlens.numel() >= 2:
        _check_boundaries(_host(cu_seqlens), total, max_seqlen)


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as numpy, without a copy: single-threaded, no wake-up of torch's pool."""
    return tensor.detach().numpy()


def _check_boundaries(cu: np.ndarray, total: int, max_seqlen: int | None) -> np.ndarray:
    """(S,) segment lengths of valid boundaries."""
    if cu[0] != 0:
        _fail(f"cu_seqlens[0]={int(cu[0])}: the first segment must start at 0")
    lengths = np.diff(cu.astype(np.int64))
    bad = np.flatnonzero(lengths < 0)
    if bad.size:
        i = int(bad[0])
        _fail(
            f"cu_seqlens decreases: cu_seqlens[{i + 1}]={int(cu[i + 1])} after cu_seqlens[{i}]={int(cu[i])}"
        )
    if cu[-1] != total:
        _fail(
            f"cu_seqlens[-1]={int(cu[-1])} but x has {total} token rows; "
            "the segments must cover exactly the rows of x, no more, no fewer"
        )
    longest = int(lengths.max())
    if max_seqlen is not None and max_seqlen < longest:
        _fail(f"max_seqlen={max_seqlen} is shorter than segment {int(lengths.argmax())} ({longest} tokens)")
    return lengths


def _check_sizes(sizes: np.ndarray, lengths: np.ndarray | None, padded: bool) -> None:
    bad = np.flatnonzero((sizes < 1).any(axis=1))
    if bad.size:
        i = int(bad[0])
        _fail(f"sizes[{i}]={tuple(sizes[i].tolist())}: a grid has at least one row and one column")
    if lengths is None:
        return
    area = sizes[:, 0].astype(np.int64) * sizes[:, 1]  # (S,)
    if padded:
        wrong, rule = area > lengths, "at least rows*cols"
    else:
        wrong, rule = (area != lengths) & (lengths != 0), "rows*cols (or 0)"
    bad = np.flatnonzero(wrong)
    if bad.size:
        i = int(bad[0])
        rows, cols = sizes[i].tolist()
        _fail(
            f"segment {i} has {int(lengths[i])} tokens (cu_seqlens) but its grid sizes[{i}]={rows}x{cols} "
            f"needs {rule} = {rows * cols}"
        )


def _check_positions(pos: np.ndarray, sizes: np.ndarray | None, lengths: np.ndarray | None) -> None:
    negative = np.flatnonzero((pos < 0).any(axis=1))
    if negative.size:
        i = int(negative[0])
        _fail(f"pos[{i}]={tuple(pos[i].tolist())} is negative")
    if sizes is None or lengths is None:
        return  # the grid is derived from pos itself
    segment = np.repeat(np.arange(lengths.shape[0]), lengths)  # (T,)
    bad = np.flatnonzero((pos >= sizes[segment]).any(axis=1))
    if bad.size:
        i = int(bad[0])
        s = int(segment[i])
        rows, cols = sizes[s].tolist()
        _fail(f"pos[{i}]={tuple(pos[i].tolist())} is outside the {rows}x{cols} grid of its segment {s}")
