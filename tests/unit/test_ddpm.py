"""fitscale.flow.ddpm against references written here from the release's formulas (numpy float64).

The references follow fit/scheduler/improved_diffusion/ of the FiT release (gaussian_diffusion.py,
diffusion_utils.py, respace.py) in plain numpy, one image per row of a (B, N, D) array; the code
under test works on packed (T, D) tokens in float64 here, so the two agree to rounding (1e-12).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fitscale.config.ddpm import DdpmConfig
from fitscale.flow import ddpm

B, N, D = 4, 6, 8  # images, tokens per image, values per token
T_IMAGES = np.array([0, 1, 500, 999])  # t == 0 exercises the decoder NLL


# ---- references (the release's formulas, numpy float64) --------------------------------------


def ref_betas(name: str, steps: int) -> np.ndarray:
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])


class Ref:
    """The release's GaussianDiffusion tables and formulas, numpy."""

    def __init__(self, betas: np.ndarray):
        self.betas = betas
        self.abar = np.cumprod(1 - betas)
        self.abar_prev = np.append(1.0, self.abar[:-1])
        self.post_var = betas * (1 - self.abar_prev) / (1 - self.abar)
        self.post_logvar = np.log(np.append(self.post_var[1], self.post_var[1:]))
        self.coef1 = betas * np.sqrt(self.abar_prev) / (1 - self.abar)
        self.coef2 = (1 - self.abar_prev) * np.sqrt(1 - betas) / (1 - self.abar)

    def col(self, table, t):
        return table[t][:, None, None]

    def q_sample(self, x0, t, noise):
        return np.sqrt(self.col(self.abar, t)) * x0 + np.sqrt(1 - self.col(self.abar, t)) * noise

    def posterior(self, x0, xt, t):
        return self.col(self.coef1, t) * x0 + self.col(self.coef2, t) * xt, self.col(self.post_logvar, t)

    def p_mean_variance(self, out, xt, t, var_type="learned_range", mean_type="epsilon"):
        if var_type == "learned_range":
            eps, v = out[..., :D], out[..., D:]
            frac = (v + 1) / 2
            logvar = frac * np.log(self.col(self.betas, t)) + (1 - frac) * self.col(self.post_logvar, t)
        else:
            eps = out
            table = np.append(self.post_var[1], self.betas[1:]) if var_type == "fixed_large" else None
            logvar = np.log(self.col(table, t)) if table is not None else self.col(self.post_logvar, t)
            logvar = logvar + 0 * xt
        if mean_type == "start_x":
            x0 = eps
        else:
            x0 = np.sqrt(1 / self.col(self.abar, t)) * xt - np.sqrt(1 / self.col(self.abar, t) - 1) * eps
        mean, _ = self.posterior(x0, xt, t)
        return mean, logvar, x0

    def vb(self, out, x0, xt, t):
        true_mean, true_logvar = self.posterior(x0, xt, t)
        mean, logvar, _ = self.p_mean_variance(out, xt, t)
        kl = 0.5 * (
            -1
            + logvar
            - true_logvar
            + np.exp(true_logvar - logvar)
            + (true_mean - mean) ** 2 * np.exp(-logvar)
        )
        cdf = lambda x: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))  # noqa: E731
        inv = np.exp(-0.5 * logvar)
        plus, minus = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
        logp = np.where(
            x0 < -0.999,
            np.log(np.maximum(plus, 1e-12)),
            np.where(
                x0 > 0.999, np.log(np.maximum(1 - minus, 1e-12)), np.log(np.maximum(plus - minus, 1e-12))
            ),
        )
        kl_bits = kl.mean(axis=(1, 2)) / np.log(2)
        nll_bits = -logp.mean(axis=(1, 2)) / np.log(2)
        return np.where(t == 0, nll_bits, kl_bits)


# ---- helpers ---------------------------------------------------------------------------------


def tokens(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.reshape(-1, x.shape[-1]).copy())


def images(x: torch.Tensor) -> np.ndarray:
    return x.numpy().reshape(B, N, -1)


def reduce(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(B, N).mean(dim=1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (B, N, D))
    x0[0, 0, :2] = [-1.0, 1.0]  # the decoder NLL's open edge bins
    noise = rng.standard_normal((B, N, D))
    out = np.concatenate([np.tanh(rng.standard_normal((B, N, D))), rng.uniform(-1, 1, (B, N, D))], axis=-1)
    return x0, noise, out


def close(a, b, tol=1e-10):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ---- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("steps", [1000, 37])
def test_schedule_tables_equal_the_releases_float64_formulas(name, steps):
    betas = ddpm.named_beta_schedule(name, steps)
    assert betas.dtype == np.float64
    np.testing.assert_array_equal(betas, ref_betas(name, steps))
    diffusion, ref = ddpm.GaussianDiffusion(betas), Ref(betas)
    np.testing.assert_array_equal(diffusion.alphas_cumprod, ref.abar)
    close(diffusion.posterior_log_variance_clipped, ref.post_logvar, 1e-14)
    close(diffusion.posterior_mean_coef1, ref.coef1, 1e-14)
    close(diffusion.posterior_mean_coef2, ref.coef2, 1e-14)
    # closed form of the posterior variance: beta_t (1 - abar_{t-1}) / (1 - abar_t); 0 at t = 0
    assert diffusion.posterior_variance[0] == 0.0
    close(diffusion.posterior_variance, ref.post_var, 1e-14)


def test_q_sample_and_posterior_match_the_reference(data):
    x0, noise, _ = data
    diffusion, ref = ddpm.GaussianDiffusion(ref_betas("linear", 1000)), Ref(ref_betas("linear", 1000))
    t = torch.from_numpy(np.repeat(T_IMAGES, N))
    xt = diffusion.q_sample(tokens(x0), t, tokens(noise))
    close(images(xt), ref.q_sample(x0, T_IMAGES, noise))
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(tokens(x0), xt, t)
    ref_mean, ref_logvar = ref.posterior(x0, images(xt), T_IMAGES)
    close(images(mean), ref_mean)
    close(images(log_variance), np.broadcast_to(ref_logvar, (B, N, D)))
    close(images(variance)[1:], np.broadcast_to(ref.col(ref.post_var, T_IMAGES), (B, N, D))[1:])


@pytest.mark.parametrize(
    "var_type,mean_type",
    [
        ("learned_range", "epsilon"),
        ("fixed_small", "epsilon"),
        ("fixed_large", "epsilon"),
        ("learned_range", "start_x"),
    ],
)
def test_p_mean_variance_matches_the_reference(data, var_type, mean_type):
    x0, noise, out = data
    if var_type != "learned_range":
        out = out[..., :D]
    betas = ref_betas("linear", 1000)
    diffusion, ref = ddpm.GaussianDiffusion(betas, mean_type, var_type), Ref(betas)
    xt = ref.q_sample(x0, T_IMAGES, noise)
    got = diffusion.p_mean_variance(tokens(out), tokens(xt), torch.from_numpy(np.repeat(T_IMAGES, N)))
    mean, logvar, x0_pred = ref.p_mean_variance(out, xt, T_IMAGES, var_type, mean_type)
    close(images(got.mean), mean)
    close(images(got.log_variance), logvar)
    close(images(got.pred_xstart), x0_pred)


@pytest.mark.parametrize("loss_type", ["mse", "rescaled_mse", "kl", "rescaled_kl"])
def test_training_losses_of_every_type_match_the_reference(data, loss_type):
    x0, noise, out = data
    steps = 1000
    betas = ref_betas("linear", steps)
    diffusion, ref = ddpm.GaussianDiffusion(betas, loss_type=loss_type), Ref(betas)
    t_tokens = torch.from_numpy(np.repeat(T_IMAGES, N))
    terms = diffusion.training_losses(
        tokens(out), tokens(x0), tokens(noise), t_tokens, reduce, torch.from_numpy(T_IMAGES)
    )
    xt = ref.q_sample(x0, T_IMAGES, noise)
    vb = ref.vb(out, x0, xt, T_IMAGES)
    mse = ((noise - out[..., :D]) ** 2).mean(axis=(1, 2))
    expected = {
        "mse": mse + vb,
        "rescaled_mse": mse + vb * steps / 1000,
        "kl": vb,
        "rescaled_kl": vb * steps,
    }[loss_type]
    close(terms["loss"].numpy(), expected)
    if loss_type.endswith("mse"):
        close(terms["mse"].numpy(), mse)
    # t == 0 is the decoder NLL, not a KL: positive bits, and unlike the KL of a perfect mean
    assert terms["loss"][0] > 0


def test_vb_trains_the_variance_only_and_kl_trains_both(data):
    x0, noise, out = data
    diffusion = ddpm.GaussianDiffusion(ref_betas("linear", 100))
    t_images = torch.tensor([0, 5, 50, 99])
    output = tokens(out).requires_grad_(True)
    terms = diffusion.training_losses(
        output, tokens(x0), tokens(noise), t_images.repeat_interleave(N), reduce, t_images
    )
    (grad,) = torch.autograd.grad(terms["vb"].sum(), output)
    assert grad[:, :D].abs().max() == 0 and grad[:, D:].abs().max() > 0


def test_normal_kl_of_equal_gaussians_is_zero_and_matches_the_closed_form():
    mean, logvar = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    assert ddpm.normal_kl(mean, logvar, mean, logvar).abs().max() < 1e-15  # 0 up to rounding
    m2, l2 = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    s1, s2 = torch.exp(0.5 * logvar), torch.exp(0.5 * l2)
    closed = torch.log(s2 / s1) + (s1**2 + (mean - m2) ** 2) / (2 * s2**2) - 0.5
    close(ddpm.normal_kl(mean, logvar, m2, l2), closed, 1e-12)


def ref_space(num: int, counts: list[int]) -> set[int]:
    size_per, extra = divmod(num, len(counts))
    start, out = 0, set()
    for i, count in enumerate(counts):
        size = size_per + (i < extra)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        out |= {start + round(k * stride) for k in range(count)}
        start += size
    return out


@pytest.mark.parametrize("spec", ["250", "10", "10,15,20", "1000", "3"])
def test_space_timesteps_matches_the_reference(spec):
    assert ddpm.space_timesteps(1000, spec) == ref_space(1000, [int(c) for c in spec.split(",")])


def test_space_timesteps_ddim_and_its_refusal():
    assert ddpm.space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    with pytest.raises(ValueError, match=r"^ddim600: no integer stride gives exactly 600 of 1000 steps$"):
        ddpm.space_timesteps(1000, "ddim600")


def test_respaced_diffusion_keeps_the_original_alpha_bars_and_feeds_the_original_timesteps():
    betas = ref_betas("linear", 1000)
    spaced = ddpm.create_diffusion(DdpmConfig(), True, "25")
    kept = sorted(ref_space(1000, [25]))
    assert spaced.timestep_map == kept
    close(spaced.alphas_cumprod, np.cumprod(1 - betas)[kept], 1e-13)


def test_one_p_sample_step_and_a_short_loop_with_fixed_noise_match_the_reference(data):
    x0, noise, _ = data
    steps = 50
    diffusion, ref = ddpm.GaussianDiffusion(ref_betas("linear", steps)), Ref(ref_betas("linear", steps))
    rng = np.random.default_rng(3)
    step_noise = rng.standard_normal((steps, B, N, D))

    def model_np(x, t):  # a fixed function of x_t and the timestep, eps then variance values
        return np.concatenate([np.tanh(0.5 * x + t / steps), np.sin(x + t)], axis=-1)

    def model(x, t):
        return torch.from_numpy(model_np(x.numpy(), float(t)))

    x = noise.copy()
    for k, i in enumerate(reversed(range(steps))):
        t = np.full(B, i)
        mean, logvar, _ = ref.p_mean_variance(model_np(x, i), x, t)
        x = mean + (i != 0) * np.exp(0.5 * logvar) * step_noise[k]
        if k == 0:
            first = x.copy()
    got = ddpm.p_sample_loop(model, diffusion, tokens(noise), lambda k: tokens(step_noise[k]))
    close(images(got), x)
    close(images(one_step(diffusion, model, noise, step_noise[0], steps - 1)), first)
    # respaced: the model is fed the original timesteps, last to first
    spaced = ddpm.GaussianDiffusion.spaced(ref_betas("linear", steps), [0, 24, 49])
    calls = []
    ddpm.p_sample_loop(
        lambda x, t: calls.append(float(t)) or model(x, t),
        spaced,
        tokens(noise),
        lambda k: tokens(step_noise[k]),
    )
    assert calls == [49.0, 24.0, 0.0]


def one_step(diffusion, model, x, noise, i):
    t = torch.full((B * N,), i)
    out = diffusion.p_mean_variance(model(tokens(x), torch.tensor(float(i))), tokens(x), t)
    return out.mean + torch.exp(0.5 * out.log_variance) * tokens(noise)


def test_model_output_of_the_wrong_width_is_refused():
    diffusion = ddpm.GaussianDiffusion(ref_betas("linear", 100))
    with pytest.raises(
        ValueError, match=r"expected \(3, 8\) \(learned variances need model.learn_sigma=true\)$"
    ):
        diffusion.p_mean_variance(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, dtype=torch.long))
