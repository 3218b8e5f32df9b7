"""The independent reference of the released FiTv2 checked on its own, before fitscale is held to it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from reference.official_fitv2 import (
    OfficialFiTv2,
    ReferenceConfig,
    official_shapes,
    pad_images,
    random_official_state_dict,
    reference_config,
    unpad,
)
from reference.pairs import relative_error
from reference.release_rope import RopeSpec, get_1d_rope_freqs, image_cos_sin, magnitude, rotate_pairs

KEY_TABLE = Path(__file__).resolve().parents[1] / "reference" / "fitv2-xl-official-keys.tsv"
SMALL = ReferenceConfig(depth=2, hidden_size=96, num_heads=2, lora_rank=16, num_classes=10)


@pytest.mark.parametrize(
    "name, expected", [("fitv2-b", 128_149_072), ("fitv2-xl", 671_045_776), ("fitv2-3b", 2_971_928_080)]
)
def test_parameter_counts_are_the_papers(name, expected):
    shapes = official_shapes(reference_config(name))
    assert sum(math.prod(shape) for shape in shapes.values()) == expected


def test_names_and_shapes_are_the_releases():
    expected = {}
    for line in KEY_TABLE.read_text().splitlines()[1:]:
        name, shape = line.split("\t")
        shape = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
        names = [name.replace("blocks.0.", f"blocks.{i}.") for i in range(36)] if ".0." in name else [name]
        expected.update(dict.fromkeys(names, shape))
    assert official_shapes(reference_config("fitv2-xl")) == expected


def test_random_weights_have_no_zero_entry():
    state = random_official_state_dict(SMALL, seed=3)
    assert all(bool((value != 0).all()) for value in state.values())
    assert set(state) == set(official_shapes(SMALL))


def test_frequency_formulas():
    a, L0, length = 36, 16, 64  # s = 4

    def freqs(method: str) -> torch.Tensor:
        return torch.tensor(get_1d_rope_freqs(method, 10000.0, a, length, L0), dtype=torch.float64)

    # Float64 formulas, a few roundings of 1.1e-16 each (measured <= 2.2e-16 relative): rtol 1e-12.
    close = dict(rtol=1e-12, atol=0.0)
    base = freqs("normal")
    assert torch.allclose(base, 10000.0 ** (-2 * torch.arange(18, dtype=torch.float64) / a), **close)
    assert torch.allclose(freqs("linear"), base / 4, **close)
    ntk = freqs("ntk-aware")
    assert ntk[0] == base[0]  # the highest frequency is untouched ...
    assert torch.allclose(ntk[-1], base[-1] / 4, **close)  # ... the lowest is interpolated by exactly s
    assert torch.equal(freqs("ntk-aware-pro1"), ntk) and torch.equal(freqs("ntk-aware-pro2"), ntk)
    # a = 36, L0 = 16: the NTK/linear ramp runs over k = 1..3 and the original/blend ramp over k = 0..1,
    # so k = 0 keeps, k = 1 is NTK, k = 2 half NTK half linear, k >= 3 linear.
    parts = freqs("ntk-by-parts")
    expected = torch.cat([base[:1], ntk[1:2], (ntk[2:3] + base[2:3] / 4) / 2, base[3:] / 4])
    assert torch.allclose(parts, expected, **close)
    # YaRN's ramp runs over k = 0..2: k = 0 keeps, k = 1 is half-way, k >= 2 interpolates.
    yarn = freqs("yarn")
    assert torch.allclose(yarn, torch.cat([base[:1], (base[1:2] / 4 + base[1:2]) / 2, base[2:] / 4]), **close)
    unscaled = torch.tensor(get_1d_rope_freqs("yarn", 10000.0, a, 10, L0), dtype=torch.float64)
    assert torch.allclose(unscaled, base, **close)  # s = max(1, 10/16) = 1


def test_magnitudes():
    def factor(method: str, grid: tuple[int, int], decouple: bool = False) -> float:
        return magnitude(RopeSpec(custom_freqs=method, decouple=decouple), *grid)

    assert (
        factor("yarn", (24, 64))
        == factor("yarn", (24, 64), decouple=True)
        == pytest.approx(0.1 * math.log(4) + 1)
    )
    assert factor("yarn", (10, 16)) == 1.0
    assert factor("ntk-aware-pro1", (12, 20)) == pytest.approx(math.sqrt(math.log(40) / math.log(16)))
    assert factor("ntk-aware-pro1", (8, 3)) == 1.0  # 2 * 8 = L0
    assert factor("ntk-aware-pro2", (12, 20)) == pytest.approx(math.sqrt(math.log(480) / math.log(256)))
    assert factor("ntk-aware-pro2", (8, 16)) == 1.0  # 2 * 8 * 16 = L0^2
    assert factor("ntk-aware", (64, 64)) == factor("ntk-by-parts", (64, 64)) == 1.0


@pytest.mark.parametrize("grid, factor", [((32, 32), 11 / 8), ((8, 8), 1.0), ((16, 16), 9 / 8)])
def test_attention_scale_multiplies_cos_and_sin(grid, factor):
    spec = RopeSpec(attn_scale=True, online_rope=True)
    _, positions, _, size = pad_images([torch.zeros(grid[0] * grid[1], 16)], [grid], 1024)
    cos, sin = image_cos_sin(spec, 64, positions[0], tuple(size[0].tolist()))
    # float64: cos^2 + sin^2 rounds a few times (measured 6e-16 relative), rtol 1e-12
    assert torch.allclose(cos**2 + sin**2, torch.full_like(cos, factor), rtol=1e-12, atol=0.0)


def test_rope_logits_depend_on_relative_position_only():
    spec = RopeSpec(online_rope=True)
    _, positions, _, size = pad_images([torch.zeros(400, 16)], [(20, 20)], 400)
    cos, sin = image_cos_sin(spec, 32, positions[0], (20, 20))
    q, k = torch.randn(2, 32, dtype=torch.float64)

    def logit(token_q, token_k):
        rq = q * cos[token_q] + rotate_pairs(q) * sin[token_q]
        rk = k * cos[token_k] + rotate_pairs(k) * sin[token_k]
        return float(rq @ rk)

    at = lambda row, col: row * 20 + col  # noqa: E731
    assert logit(at(1, 2), at(4, 7)) == pytest.approx(logit(at(10, 12), at(13, 17)), rel=1e-9)
    assert logit(at(1, 2), at(4, 7)) != pytest.approx(logit(at(1, 2), at(7, 4)), rel=1e-3)  # rows != cols


def test_rope_rows_come_first_and_grid_is_column_then_row():
    _, positions, _, _ = pad_images([torch.zeros(6, 16)], [(2, 3)], 8)
    assert positions[0, :, :6].tolist() == [[0, 1, 2, 0, 1, 2], [0, 0, 0, 1, 1, 1]]
    cos, sin = image_cos_sin(RopeSpec(online_rope=True), 8, positions[0], (2, 3))
    token = 5  # row 1, column 2
    # float64 tables (measured equal): rtol 1e-12 allows the release's angle products a few roundings
    one, two = torch.tensor(1.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    assert torch.allclose(cos[token, :2], torch.cos(one).expand(2), rtol=1e-12, atol=0.0)
    assert torch.allclose(sin[token, 4:6], torch.sin(two).expand(2), rtol=1e-12, atol=0.0)


def _small_model(rope: RopeSpec | None = None) -> OfficialFiTv2:
    from dataclasses import replace

    model = OfficialFiTv2(replace(SMALL, rope=rope or RopeSpec()))
    model.load_state_dict(random_official_state_dict(model.config, seed=1))
    return model.eval()


@pytest.mark.numeric
def test_padded_output_ignores_the_limit_and_the_other_images():
    model = _small_model(RopeSpec(custom_freqs="yarn", decouple=True, attn_scale=True, online_rope=True))
    grids = [(12, 20), (5, 31), (8, 8)]
    images = [torch.randn(r * c, 16) for r, c in grids]
    t, y = torch.tensor([0.3, 0.6, 0.9]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        together = unpad(model(*_padded(images, grids, t, y, 256)), grids)
        for i in range(3):
            alone = unpad(
                model(*_padded(images[i : i + 1], grids[i : i + 1], t[i : i + 1], y[i : i + 1], 512)),
                grids[i : i + 1],
            )[0]
            # fp32, other padded shapes: matmul blocking differs (measured <= 3e-7 of the norm)
            assert relative_error(alone, together[i]) < 1e-5


def _padded(images, grids, t, y, limit):
    x, grid, mask, size = pad_images(images, grids, limit)
    return x, t, y, grid, mask, size


@pytest.mark.numeric
def test_explicit_softmax_equals_math_sdpa():
    model = _small_model()
    attention = model.blocks[0].attn
    x, _, mask, _ = pad_images([torch.randn(60, 96), torch.randn(100, 96)], [(6, 10), (10, 10)], 128)
    mask2d = mask[:, :, None] == mask[:, None, :]
    cos = torch.ones(2, 128, 48)
    sin = torch.zeros(2, 128, 48)
    with torch.no_grad():
        ours = attention(x, mask2d, cos, sin)
        qkv = attention.qkv(x).reshape(2, 128, 3, 2, 48).permute(2, 0, 3, 1, 4)
        q, k = (F.layer_norm(v, (48,), eps=1e-6) for v in qkv[:2])
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, qkv[2], attn_mask=mask2d[:, None])
        expected = attention.proj(out.transpose(1, 2).reshape(2, 128, 96))
    # fp32, explicit softmax vs SDPA's math kernel: other summation orders (measured <= 2e-7 of the norm)
    assert relative_error(ours, expected) < 1e-5
