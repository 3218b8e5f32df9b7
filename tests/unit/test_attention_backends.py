"""Every attention backend against one reference: dense per-image softmax attention in float64.

CUDA backends are skipped without a GPU and run when one is present (tools/gpu_check.sh).
"""

import dataclasses
import math

import pytest
import torch
from reference.pairs import relative_error

from fitscale.data.batch import cu_seqlens_from_lengths
from fitscale.models.attention import (
    build_document_mask,
    flash_attn_available,
    length_groups,
    torch_varlen_available,
    varlen_attention,
)

LENGTHS = [256, 240, 64, 155, 1, 17, 0, 0]  # 16x16, 12x20, 8x8, 5x31, odd sizes; empty (+static)
# Relative (norm) error against float64. fp32: ~300 unit roundoffs (6e-8), measured 3.2e-7 under every
# ATEN_CPU_CAPABILITY. bf16: the inputs and output alone round by 2^-8 = 3.9e-3; measured 3.3e-3, so
# ten roundoffs. fp16 (CUDA only): about eight roundoffs of 4.9e-4. A leak across documents is O(1).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 4e-3}


def dense_reference(q, k, v, lengths):
    """softmax(q k^T / sqrt(d)) v image by image, in float64."""
    out, start = [], 0
    for n in lengths:
        qi, ki, vi = (t[start : start + n].double().transpose(0, 1) for t in (q, k, v))  # (H, n, d)
        weights = torch.softmax(qi @ ki.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        out.append((weights @ vi).transpose(0, 1))
        start += n
    return torch.cat(out)


def cases():
    for backend in ("reference", "grouped", "flex", "varlen", "flash"):
        for device in ("cpu", "cuda"):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                reason = None
                if backend in ("varlen", "flash") and (device == "cpu" or dtype == torch.float32):
                    continue  # these kernels exist for CUDA half precision only
                elif backend == "flash" and not flash_attn_available():
                    reason = "flash-attn is not installed"
                elif backend == "varlen" and not torch_varlen_available():
                    reason = "torch.nn.attention.varlen is not available"
                elif device == "cpu" and dtype == torch.float16:
                    continue
                marks = [pytest.mark.skip(reason=reason)] if reason else []
                if device == "cuda":
                    marks.append(pytest.mark.gpu)
                yield pytest.param(
                    backend, device, dtype, marks=marks, id=f"{backend}-{device}-{str(dtype)[6:]}"
                )


@pytest.mark.numeric
@pytest.mark.parametrize("backend, device, dtype", list(cases()))
def test_backend_matches_dense_reference(backend, device, dtype):
    torch.manual_seed(0)
    heads, head_dim, total = 4, 72, sum(LENGTHS)
    q, k, v = (torch.randn(total, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    cu_seqlens = cu_seqlens_from_lengths(LENGTHS).to(device)
    packed = build_document_mask(cu_seqlens, max(LENGTHS), total, backend, q.device, q.dtype)
    assert packed.backend == backend
    with torch.no_grad():
        out = varlen_attention(q, k, v, packed)
    expected = dense_reference(q.cpu(), k.cpu(), v.cpu(), LENGTHS)
    error = relative_error(out.cpu(), expected)
    assert error < TOLERANCE[dtype], f"{backend} relative error {error:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "varlen", "flash"])
def test_cuda_backend_gradients_match_reference(backend):
    if backend == "flash" and not flash_attn_available():
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(0)
    total = sum(LENGTHS)
    base = [torch.randn(total, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    cu_seqlens = cu_seqlens_from_lengths(LENGTHS).to("cuda")
    grads = {}
    for name in (backend, "reference"):
        q, k, v = (t.clone().requires_grad_() for t in base)
        packed = build_document_mask(cu_seqlens, max(LENGTHS), total, name, q.device, q.dtype)
        varlen_attention(q, k, v, packed).float().square().sum().backward()
        grads[name] = torch.cat([t.grad.flatten().float() for t in (q, k, v)])
    error = (grads[backend] - grads["reference"]).norm() / grads["reference"].norm()
    assert error < 3e-2


# Repeated lengths apart from each other (the gather reorders them), length 1, an empty segment.
GROUPED_LENGTHS = [64, 1, 17, 64, 0, 256, 1, 17, 17, 64, 3]


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_grouped_forward_and_gradients_match_dense_reference(dtype):
    torch.manual_seed(0)
    heads, head_dim, total = 4, 16, sum(GROUPED_LENGTHS)
    base = [torch.randn(total, heads, head_dim, dtype=dtype) for _ in range(3)]
    bounds = cu_seqlens_from_lengths(GROUPED_LENGTHS)
    packed = build_document_mask(bounds, max(GROUPED_LENGTHS), total, "grouped", base[0].device, dtype)
    q, k, v = (t.clone().requires_grad_() for t in base)
    out = varlen_attention(q, k, v, packed)
    weight = torch.randn(out.shape, dtype=torch.float64)  # a loss that weighs every output differently
    (out.double() * weight).sum().backward()
    q64, k64, v64 = (t.double().requires_grad_() for t in base)
    expected = dense_reference(q64, k64, v64, [n for n in GROUPED_LENGTHS if n])
    (expected * weight).sum().backward()
    for name, ours, exact in (
        ("out", out, expected),
        *zip("qkv", (q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad)),
    ):
        error = relative_error(ours.detach(), exact.detach())
        assert error < TOLERANCE[dtype], f"grouped {name} relative error {error:.2e}"


def test_grouped_gathers_only_when_equal_lengths_are_apart():
    apart = length_groups(torch.tensor([0, 4, 6, 10], dtype=torch.int32))  # lengths 4, 2, 4
    assert apart.shapes == [(2, 4), (1, 2)]
    assert apart.order.tolist() == [0, 1, 2, 3, 6, 7, 8, 9, 4, 5]
    assert apart.order[apart.inverse].tolist() == list(range(10))
    adjacent = length_groups(torch.tensor([0, 4, 8, 8, 10], dtype=torch.int32))  # 4, 4, empty, 2
    assert adjacent.shapes == [(2, 4), (1, 2)] and adjacent.order is None


def test_auto_picks_the_grouped_exact_path_on_cpu():
    cu = torch.tensor([0, 4], dtype=torch.int32)
    assert build_document_mask(cu, 4, 4, "auto", torch.device("cpu"), torch.bfloat16).backend == "grouped"


def test_explicit_cuda_backend_on_cpu_says_why():
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="attn_backend='varlen' needs"):
        build_document_mask(cu, 4, 4, "varlen", torch.device("cpu"), torch.float32)


@pytest.mark.numeric
def test_padded_baseline_computes_the_packed_function():
    """The release's layout (each image padded to N tokens, dense key mask) gives the same outputs."""
    from fitscale.data.batch import grid_positions, pack_images
    from fitscale.models import build_model

    torch.manual_seed(0)
    grids, n = [(4, 4), (3, 5), (2, 7)], 20
    images = [torch.randn(r * c, 16) for r, c in grids]
    packed = pack_images(images, grids, [1, 2, 3], [0, 1, 2])
    model = build_model("tiny").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    t = torch.rand(3)
    with torch.no_grad():
        expected = model(packed.tokens, t, packed.labels, packed.pos, packed.cu_seqlens, packed.max_seqlen)
        model.config = model.config.replace(attn_backend="padded")
        tokens = torch.cat([torch.cat([img, torch.zeros(n - img.shape[0], 16)]) for img in images])
        pos = torch.cat(
            [
                torch.cat([grid_positions(*g), torch.zeros(n - g[0] * g[1], 2, dtype=torch.int64)])
                for g in grids
            ]
        )
        cu = torch.arange(4, dtype=torch.int32) * n
        out = model(tokens, t, packed.labels, pos, cu, n, sizes=packed.sizes)
    real = torch.cat([torch.arange(i * n, i * n + r * c) for i, (r, c) in enumerate(grids)])
    # fp32, other shapes (padding), so other matmul blocking: measured ratio to this bound <= 0.075
    torch.testing.assert_close(out[real], expected, rtol=1e-5, atol=1e-6)


def test_every_configurable_backend_is_registered_and_says_what_it_needs():
    from fitscale.config.model import ATTENTION_BACKENDS
    from fitscale.models.attention import AUTO_ORDER, BACKENDS

    assert set(ATTENTION_BACKENDS) == {"auto", *BACKENDS}
    assert set(AUTO_ORDER) <= set(BACKENDS)
    assert all(backend.name == name and backend.needs for name, backend in BACKENDS.items())


def test_unknown_or_missing_backend_names_what_to_do(monkeypatch):
    from fitscale.models.attention import BACKENDS, select_backend

    cpu = torch.device("cpu")
    with pytest.raises(
        ValueError, match=r"^attn_backend='flsh' is not an attention backend; use one of auto, flash, "
    ):
        select_backend("flsh", cpu, torch.float32)
    monkeypatch.setitem(BACKENDS, "flash", dataclasses.replace(BACKENDS["flash"], available=lambda: False))
    with pytest.raises(
        RuntimeError,
        match=r"^attn_backend='flash' needs the flash-attn package: pip install 'fitscale\[flash\]'$",
    ):
        select_backend("flash", torch.device("cuda"), torch.bfloat16)
    monkeypatch.setitem(BACKENDS, "varlen", dataclasses.replace(BACKENDS["varlen"], available=lambda: True))
    expected = "attn_backend='varlen' needs CUDA fp16/bf16 inputs, got cpu torch.float32; "
    with pytest.raises(
        RuntimeError, match=rf"^{expected}set model.attn_backend=auto to pick one that runs here$"
    ):
        select_backend("varlen", cpu, torch.float32)
