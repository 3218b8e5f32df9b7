"""ODE samplers and guidance: exact Gaussian flow, agreement between samplers, packed guidance."""

from __future__ import annotations

import pytest
import torch

from fitscale.flow.guidance import PackedVelocity, guide
from fitscale.flow.samplers import dopri5, euler, heun, integrate, time_grid

torch.set_default_dtype(torch.float32)


def gaussian_velocity(mu: torch.Tensor, sigma: torch.Tensor):
    """The exact rectified-flow velocity for x1 ~ N(mu, sigma^2), x0 ~ N(0, 1), x_t = t x1 + (1 - t) x0.

    E[x1 - x0 | x_t = x] = mu + (t sigma^2 - (1 - t)) / (t^2 sigma^2 + (1 - t)^2) (x - t mu); along the
    flow x_t = t mu + sqrt(t^2 sigma^2 + (1 - t)^2) x0, so the endpoint is mu + sigma x0.
    """

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x.dtype)
        variance = t**2 * sigma**2 + (1 - t) ** 2
        return mu + (t * sigma**2 - (1 - t)) / variance * (x - t * mu)

    return velocity


@pytest.fixture
def gaussian():
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(64, 16, generator=generator, dtype=torch.float64) * 2
    sigma = torch.rand(64, 16, generator=generator, dtype=torch.float64) * 1.5 + 0.1
    x0 = torch.randn(64, 16, generator=generator, dtype=torch.float64)
    return gaussian_velocity(mu, sigma), x0, mu + sigma * x0


def test_samplers_reach_the_exact_gaussian_endpoint(gaussian):
    velocity, x0, exact = gaussian
    cases = {
        "euler": (euler(velocity, x0, 400), 2e-2),
        "heun": (heun(velocity, x0, 50), 2e-3),
        "dopri5": (dopri5(velocity, x0, atol=1e-8, rtol=1e-8), 1e-5),
    }
    for name, (result, tolerance) in cases.items():
        error = (result.x - exact).abs().max().item()
        assert error < tolerance, f"{name}: max error {error:.2e} >= {tolerance:.0e}"
    assert cases["euler"][0].evaluations == 400
    assert cases["heun"][0].evaluations == 100


def test_error_shrinks_at_each_sampler_order(gaussian):
    velocity, x0, exact = gaussian
    err = lambda fn, n: (fn(velocity, x0, n).x - exact).abs().max().item()
    assert 1.6 < err(euler, 50) / err(euler, 100) < 2.4  # first order
    assert 3.2 < err(heun, 50) / err(heun, 100) < 4.8  # second order


def test_samplers_agree_with_each_other(gaussian):
    velocity, x0, _ = gaussian
    reference = dopri5(velocity, x0, atol=1e-9, rtol=1e-9).x
    for sampler, steps in (("euler", 1000), ("heun", 100)):
        x = integrate(velocity, x0, sampler, steps).x
        assert torch.allclose(x, reference, atol=1e-2 if sampler == "euler" else 1e-3), sampler


def test_time_shift_keeps_the_endpoint(gaussian):
    velocity, x0, exact = gaussian
    grid = time_grid(10, time_shift=0.3)
    assert grid[0] == 0 and grid[-1] == 1 and (grid[1:] > grid[:-1]).all()
    assert grid[1] < 0.1 * 0.5  # more steps near noise
    assert (heun(velocity, x0, 100, time_shift=0.3).x - exact).abs().max() < 5e-3
    assert (dopri5(velocity, x0, atol=1e-8, rtol=1e-8, time_shift=0.3).x - exact).abs().max() < 1e-5


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="unknown sampler 'rk4'; choose one of euler, heun, dopri5"):
        integrate(lambda x, t: x, torch.zeros(1), "rk4")


def test_guidance_first_three_channels_keep_the_conditional_rest():
    v_cond = torch.randn(5, 16)
    v_uncond = torch.randn(5, 16)
    full = guide(v_cond, v_uncond, 4.0)
    assert torch.allclose(full, v_uncond + 4.0 * (v_cond - v_uncond))
    first3 = guide(v_cond, v_uncond, 4.0, guidance_channels=3)
    assert torch.equal(first3[:, :12], full[:, :12])
    assert torch.equal(first3[:, 12:], v_cond[:, 12:])
    assert torch.allclose(guide(v_cond, v_uncond, 1.0), v_cond)


def test_packed_guidance_equals_two_separate_passes():
    from fitscale.models import build_model
    from fitscale.sample.plan import SampleItem, initial_noise, pack_layout

    torch.manual_seed(0)
    model = build_model("tiny", attn_backend="reference").eval()
    for p in model.parameters():  # released init zeroes the output; give it a real function
        torch.nn.init.normal_(p, std=0.05)
    items = [SampleItem(0, 3, 4, 6), SampleItem(1, 7, 5, 5)]
    layout = pack_layout(items, torch.device("cpu"))
    x = torch.cat([initial_noise(item, 16, seed=1) for item in items])
    t = torch.tensor(0.4)
    guided = PackedVelocity(model, layout, cfg_scale=2.5)(x, t)
    with torch.no_grad():
        args = (layout.pos, layout.cu_seqlens, layout.max_seqlen, layout.sizes)
        cond = model(x, t.expand(2), layout.labels, *args)
        uncond = model(x, t.expand(2), torch.full_like(layout.labels, 10), *args)
    assert torch.allclose(guided, uncond + 2.5 * (cond - uncond), atol=1e-5)
