"""ODE and SDE samplers and guidance: the exact Gaussian flow, agreement with torchdiffeq, per-image
step control, the release's SDE end distributions and guidance schedule, packed guidance."""

from __future__ import annotations

import math

import pytest
import torch

from fitscale.flow.guidance import PackedVelocity, guidance_scale, guide
from fitscale.flow.per_image import integrate_per_image
from fitscale.flow.samplers import ADAPTIVE, dopri5, euler, heun, integrate, odeint_endpoint, time_grid
from fitscale.flow.sde import DIFFUSION_FORMS, diffusion_coefficient, sample_sde

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
    message = (
        "unknown sampler 'rk5'; choose one of euler, heun, midpoint, rk4, heun2, heun3, implicit_adams, "
        "dopri5, dopri8, bosh3, fehlberg2, adaptive_heun"
    )
    with pytest.raises(ValueError, match=message):
        integrate(lambda x, t: x, torch.zeros(1), "rk5")


@pytest.mark.parametrize(
    "sampler, tolerance, bound",
    [
        ("midpoint", None, 1e-4),
        ("rk4", None, 1e-5),
        ("heun3", None, 2e-5),
        ("implicit_adams", 1e-7, 1e-5),
        ("dopri5", 1e-7, 1e-5),
        # dopri8 and bosh3 overshoot t = 1 and interpolate back: their dense output bounds the error
        ("dopri8", 1e-7, 5e-5),
        ("bosh3", 1e-7, 1e-4),
        ("fehlberg2", 1e-7, 2e-4),
        ("adaptive_heun", 1e-6, 1e-5),
    ],
)
def test_every_torchdiffeq_sampler_reaches_the_exact_gaussian_endpoint(gaussian, sampler, tolerance, bound):
    velocity, x0, exact = gaussian
    if tolerance is None:
        result = integrate(velocity, x0, sampler, steps=40)
    else:
        steps = 40 if sampler == "implicit_adams" else 0
        result = integrate(velocity, x0, sampler, steps=steps, atol=tolerance, rtol=tolerance)
    error = (result.x - exact).abs().max().item()
    assert error < bound, f"{sampler}: max error {error:.2e}"


def test_written_out_euler_and_heun_equal_torchdiffeqs(gaussian):
    velocity, x0, _ = gaussian
    for ours, theirs in ((euler, "euler"), (heun, "heun2")):
        for shift in (1.0, 0.5):
            expected = odeint_endpoint(velocity, x0, theirs, steps=30, time_shift=shift).x
            assert torch.allclose(ours(velocity, x0, 30, shift).x, expected, rtol=0, atol=1e-12), theirs


def per_image_gaussians(seed: int = 1):
    """Three "images" of 5, 9 and 2 tokens, each a Gaussian of its own, and their velocities."""
    generator = torch.Generator().manual_seed(seed)
    lengths = (5, 9, 2)
    mus = [torch.randn(n, 16, generator=generator) * 2 for n in lengths]
    sigmas = [torch.rand(n, 16, generator=generator) * 1.5 + 0.1 for n in lengths]
    states = [torch.randn(n, 16, generator=generator) for n in lengths]
    velocities = [gaussian_velocity(m, s) for m, s in zip(mus, sigmas)]
    return states, velocities


@pytest.mark.parametrize("sampler", ADAPTIVE)
def test_adaptive_steps_are_controlled_per_image(sampler):
    states, velocities = per_image_gaussians()
    calls = []

    def batched(images, xs, ts):
        calls.append(list(images))
        return [velocities[i](x, t) for i, x, t in zip(images, xs, ts)]

    result = integrate_per_image(batched, states, sampler, atol=1e-4, rtol=1e-3)
    for image, (state, velocity) in enumerate(zip(states, velocities)):
        alone = odeint_endpoint(velocity, state, sampler, atol=1e-4, rtol=1e-3)
        assert torch.equal(result.xs[image], alone.x), f"image {image} differs from its solve alone"
        assert result.evaluations[image] == alone.evaluations
    assert result.calls == len(calls) == max(result.evaluations)
    assert calls[0] == [0, 1, 2]  # images share forwards, and drop out as they finish
    # One step size for the whole batch (the release's way) moves the images: the test can fail.
    shared = integrate(
        lambda x, t: torch.cat([v(c, t) for v, c in zip(velocities, x.split([5, 9, 2]))]),
        torch.cat(states),
        sampler,
        atol=1e-4,
        rtol=1e-3,
    ).x.split([5, 9, 2])
    assert max((a - b).abs().max().item() for a, b in zip(shared, result.xs)) > 1e-6


def test_a_failing_velocity_ends_every_per_image_solve():
    states, _ = per_image_gaussians()

    def broken(images, xs, ts):
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        integrate_per_image(broken, states, "dopri5")


def test_diffusion_forms_are_the_releases():
    t, norm = 0.25, 0.5  # values of the release's ICPlan.compute_diffusion, worked out by hand
    expected = {
        "constant": 0.5,
        "sbdm": 0.5 * 3.0,  # norm (1 - t) / t
        "sigma": 0.375,
        "linear": 0.375,
        "decreasing": 0.25 * (0.5 * math.cos(math.pi / 4) + 1) ** 2,
        "increasing-decreasing": 0.25,
    }
    assert set(expected) == set(DIFFUSION_FORMS)
    for form, value in expected.items():
        assert diffusion_coefficient(form, t, norm) == pytest.approx(value, rel=1e-12), form


def sde_end_distribution(mu: float, s: float, last_step: str, g1: float, h: float) -> tuple[float, float]:
    """Mean and std at the end, when the SDE keeps the flow's marginal N(t mu, t^2 s^2 + (1 - t)^2)
    up to t1 = 1 - h and the last step is a linear map of x (the velocity is linear in x)."""
    if last_step == "none":
        return mu, s
    t = 1 - h
    variance = t**2 * s**2 + (1 - t) ** 2
    slope = (t * s**2 - (1 - t)) / variance  # d v / d x
    if last_step == "mean":  # x + h (v + g score), score slope -1 / variance
        slope = slope - g1 / variance
    return mu, math.sqrt(variance) * (1 + h * slope)  # euler and tweedie: x + h v


@pytest.mark.parametrize(
    "sampler, form, last_step, norm",
    [("euler", form, "mean", 1.0) for form in DIFFUSION_FORMS]
    + [("heun", form, "mean", 1.0) for form in DIFFUSION_FORMS]
    + [("euler", "sigma", last, 1.0) for last in ("tweedie", "euler", "none")]
    + [("heun", "constant", last, 1.0) for last in ("tweedie", "euler")]
    + [("euler", "constant", "mean", 2.0), ("heun", "sigma", "mean", 0.3)],
)
def test_sde_ends_on_the_exact_gaussian(sampler, form, last_step, norm):
    mu, s, n = 0.7, 0.5, 20_000  # below torch's 32k-element grain: one thread, fast on a busy machine
    h = 0.0 if last_step == "none" else 0.04
    noise = lambda step: torch.randn(
        n, generator=torch.Generator().manual_seed(1000 + step), dtype=torch.float64
    )
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    velocity = gaussian_velocity(torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    result = sample_sde(velocity, x0, noise, 200, sampler, form, norm, last_step, h)
    g1 = diffusion_coefficient(form, 1 - h, norm)
    mean, std = sde_end_distribution(mu, s, last_step, g1, h)
    # Fixed seeds; 200 steps leave a discretisation bias of at most ~1% in the spread.
    assert result.x.mean().item() == pytest.approx(mean, abs=0.015)
    assert result.x.std().item() == pytest.approx(std, rel=0.03)
    per_step = 1 if sampler == "euler" else 2
    assert result.evaluations == 200 * per_step + (last_step != "none")


def test_sde_with_wrong_noise_scale_misses_the_gaussian():
    """The test above can fail: noise of half the right size leaves the spread visibly wrong."""
    mu, s, n = 0.7, 0.5, 20_000
    half = lambda step: (
        0.5 * torch.randn(n, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
    )
    x0 = torch.randn(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    velocity = gaussian_velocity(torch.tensor(mu, dtype=torch.float64), torch.tensor(s, dtype=torch.float64))
    x = sample_sde(velocity, x0, half, 200, "euler", "constant", 1.0, "none", 0.0).x
    assert abs(x.std().item() / s - 1) > 0.1


def test_guidance_schedule_is_the_releases():
    t = torch.tensor([0.0, 0.5, 1.0, 1.2])
    assert torch.equal(guidance_scale(4.0, t, 0.0), torch.full((4,), 4.0))
    # (cfg - 1) (1 - cos(pi (1 - min(t, 1))^p)) / 2 + 1: full at noise, none at data.
    assert torch.allclose(guidance_scale(4.0, t, 1.0), torch.tensor([4.0, 2.5, 1.0, 1.0]))
    expected_half = 3.0 * (1 - math.cos(math.pi * 0.5**2)) / 2 + 1
    assert guidance_scale(4.0, t, 2.0)[1].item() == pytest.approx(expected_half)


def test_guidance_first_three_channels_keep_the_conditional_rest():
    v_cond = torch.randn(5, 16)
    v_uncond = torch.randn(5, 16)
    full = guide(v_cond, v_uncond, 4.0)
    assert torch.allclose(full, v_uncond + 4.0 * (v_cond - v_uncond))
    first3 = guide(v_cond, v_uncond, 4.0, guidance_channels=3)
    assert torch.equal(first3[:, :12], full[:, :12])
    assert torch.equal(first3[:, 12:], v_cond[:, 12:])
    assert torch.allclose(guide(v_cond, v_uncond, 1.0), v_cond)


def tiny_random_model():
    from fitscale.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", attn_backend="reference").eval()
    for p in model.parameters():  # released init zeroes the output; give it a real function
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_packed_guidance_equals_two_separate_passes():
    from fitscale.sample.plan import SampleItem, initial_noise, pack_layout

    model = tiny_random_model()
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


def test_scheduled_guidance_of_images_at_their_own_times():
    from fitscale.sample.plan import SampleItem, initial_noise, pack_layout

    model = tiny_random_model()
    items = [SampleItem(0, 3, 4, 6), SampleItem(1, 7, 5, 5), SampleItem(2, 1, 3, 3)]
    layout = pack_layout(items, torch.device("cpu"))
    velocity = PackedVelocity(model, layout, cfg_scale=3.0, guidance_channels=3, scale_pow=1.0)
    xs = [initial_noise(item, 16, seed=1) for item in items]
    times = [torch.tensor(0.7), torch.tensor(0.2)]
    got = velocity.images([2, 0], [xs[2], xs[0]], times)
    for image, x, t, v in zip((2, 0), (xs[2], xs[0]), times, got):
        one = layout.select([image])
        with torch.no_grad():
            args = (one.pos, one.cu_seqlens, one.max_seqlen, one.sizes)
            cond = model(x, t.reshape(1), one.labels, *args)
            uncond = model(x, t.reshape(1), torch.full_like(one.labels, 10), *args)
        scale = 1 + 2.0 * (1 - math.cos(math.pi * (1 - t.item()))) / 2
        expected = torch.cat([(uncond + scale * (cond - uncond))[:, :12], cond[:, 12:]], dim=1)
        assert torch.allclose(v, expected, atol=1e-5), f"image {image}"


def test_the_config_choice_of_sampler_is_the_sampler_registry():
    """`train.sample_sampler` is a Literal in config/ (below flow/); it must list exactly the samplers."""
    from typing import get_args

    from fitscale.config.train import SamplerName
    from fitscale.flow.samplers import SAMPLERS

    assert get_args(SamplerName) == SAMPLERS
