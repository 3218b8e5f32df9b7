"""The release's Gaussian diffusion (FiT v1, `use_sit: false`) on packed token batches.

Written from fit/scheduler/improved_diffusion/ of the release (itself IDDPM / ADM code):
`gaussian_diffusion.py` (schedules, tables, q_sample, posterior, p_mean_variance, the VB terms and
`training_losses`), `diffusion_utils.py` (normal_kl, discretized_gaussian_log_likelihood) and
`respace.py` (space_timesteps, SpacedDiffusion). diffusers' DDPMScheduler (0.39) builds its
betas in float32 torch, not the release's float64 numpy: 1.4e-9 (linear) and 2.2e-8 (cosine) off,
and it has no learned-variance losses, so it is not used. The tables here are the release's,
float64 numpy, read per token in x's dtype (float32 for a float32 x, as the release's
`_extract_into_tensor` does).

Layout. The release works on (B, C, N) images; here x is (T, D) packed tokens, D = p*p*C values
per token in (c p1 p2) order, and the timestep index is given per token (T,). Everything but the
means over an image is elementwise, so it is the release's arithmetic value for value; the means
(`mean_flat`) are taken per image by a `reduce` function (T,) -> (N,) that the caller supplies
(fitscale.flow.ddpm_loss uses each image's own tokens).

Differences from the release, all on padded batches only (the release pads images to a common N
with a mask; fitscale packs them, so with no padding both agree):
- MSE: the release's `mean_flat((target*mask - out)**2) * ratio` is the mean over the image's own
  tokens when the model outputs zeros on padding; here it is that mean by construction.
- VB: the release averages the KL / decoder NLL over all N tokens, padding included, then
  multiplies by N / n_real; padding tokens carry no gradient to the mean there but add a constant
  KL. Here the VB term is the mean over the image's own tokens, what the release computes for an
  unpadded image.
- The release's `LEARNED` variance type takes the same branch as `LEARNED_RANGE` (an interpolation
  between the clipped posterior and beta log-variances); it is kept that way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from fitscale.config.ddpm import DdpmConfig
from fitscale.errors import UserError

MEAN_TYPES = ("epsilon", "start_x")
VAR_TYPES = ("learned_range", "learned", "fixed_small", "fixed_large")
LOSS_TYPES = ("mse", "rescaled_mse", "kl", "rescaled_kl")
LOG2 = math.log(2.0)


def named_beta_schedule(name: str, steps: int) -> np.ndarray:
    """(steps,) float64 betas of the release's `get_named_beta_schedule` (gaussian_diffusion.py 98-122).

    `linear`: Ho et al.'s 1e-4 .. 2e-2, scaled by 1000 / steps; `squaredcos_cap_v2`: the cosine
    alpha-bar of Nichol and Dhariwal discretised with betas capped at 0.999. UserError otherwise.
    """
    if name == "linear":
        scale = 1000 / steps
        return np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    if name == "squaredcos_cap_v2":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)]
        )
    raise UserError(f"train.ddpm.noise_schedule={name!r}: choose linear or squaredcos_cap_v2")


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """The original timesteps kept by a respacing, as the release's respace.py `space_timesteps`.

    `section_counts` is "N" / "N1,N2,..." (steps per equal section of the process, evenly strided
    with rounding) or "ddimN" (the DDIM paper's integer stride giving exactly N steps). Raises
    UserError when a section cannot hold its count or no integer stride gives N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise UserError(
                f"ddim{desired}: no integer stride gives exactly {desired} of {num_timesteps} steps"
            )
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise UserError(f"cannot take {count} sampling steps from a section of {size} diffusion steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            steps.append(start + round(position))
            position += stride
        start += size
    return set(steps)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats (diffusion_utils.py 10-36)."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The release's tanh approximation of the standard normal CDF (diffusion_utils.py 39-44)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Log-probability (nats, x's shape) of x under a Gaussian discretised to 8-bit bins of [-1, 1]
    (diffusion_utils.py 62-90): bins of width 2/255, the edge bins open to +-infinity."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@dataclass
class MeanVariance:
    """p(x_{t-1} | x_t) of the model at one state: each (T, D) in x's dtype."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor


class GaussianDiffusion:
    """The release's GaussianDiffusion / SpacedDiffusion: float64 tables of a beta schedule, read per token.

    `timestep_map[i]` is the original timestep of (respaced) step i, what the model is fed; the
    identity for an unspaced diffusion. mean_type: `epsilon` | `start_x`; var_type:
    `learned_range` | `learned` (the release treats both alike) | `fixed_small` | `fixed_large`;
    loss_type: `mse` | `rescaled_mse` | `kl` | `rescaled_kl`.
    """

    def __init__(
        self,
        betas: np.ndarray,
        mean_type: str = "epsilon",
        var_type: str = "learned_range",
        loss_type: str = "mse",
        timestep_map: list[int] | None = None,
    ):
        for name, value, allowed in (
            ("mean_type", mean_type, MEAN_TYPES),
            ("var_type", var_type, VAR_TYPES),
            ("loss_type", loss_type, LOSS_TYPES),
        ):
            if value not in allowed:
                raise UserError(f"ddpm {name}={value!r}: choose one of {', '.join(allowed)}")
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 2 or not ((betas > 0).all() and (betas <= 1).all()):
            raise UserError(
                f"ddpm betas must be a 1-D array of at least 2 values in (0, 1], got shape {betas.shape}"
            )
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self._device_tables: dict[tuple, torch.Tensor] = {}  # extract's copies of the tables
        self.learned = var_type in ("learned", "learned_range")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = list(range(self.num_timesteps)) if timestep_map is None else list(timestep_map)
        # gaussian_diffusion.py 174-201, in the release's order of operations
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the posterior variance is 0 at t = 0: its log takes t = 1's value there
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )
        self.log_betas = np.log(betas)
        fixed_large = np.append(self.posterior_variance[1], betas[1:])  # a better decoder NLL at t = 0
        self.fixed_variance = {
            "fixed_large": (fixed_large, np.log(fixed_large)),
            "fixed_small": (self.posterior_variance, self.posterior_log_variance_clipped),
        }.get(var_type)

    @classmethod
    def spaced(cls, betas: np.ndarray, use_timesteps: Iterable[int], **kwargs) -> GaussianDiffusion:
        """The diffusion over the kept timesteps only (respace.py SpacedDiffusion): betas recomputed
        from the kept alphas_cumprod, and the model fed the original timestep."""
        keep = set(use_timesteps)
        base = np.cumprod(1.0 - np.array(betas, dtype=np.float64))
        last, new_betas, timestep_map = 1.0, [], []
        for i, alpha_cumprod in enumerate(base):
            if i in keep:
                new_betas.append(1 - alpha_cumprod / last)
                last = alpha_cumprod
                timestep_map.append(i)
        return cls(np.array(new_betas), timestep_map=timestep_map, **kwargs)

    # ---- tables ------------------------------------------------------------------------------

    def extract(self, table: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] (t: (T,) long indices) as a (T, 1) column in like's dtype and device.

        `table` is one of this diffusion's float64 tables; its copy on like's device and dtype is
        kept, so a training step copies no table to the accelerator after the first.
        """
        key = (id(table), like.device, like.dtype)
        column = self._device_tables.get(key)
        if column is None:
            column = self._device_tables[key] = torch.from_numpy(table).to(like.device).to(like.dtype)
        return column[t][:, None]

    # ---- forward process and posterior ---------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, (T, D); t (T,) indices, 0 = one step."""
        return (
            self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), each (T, D) / (T, 1)."""
        mean = (
            self.extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self.extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self.extract(self.posterior_variance, t, x_t).expand_as(x_t)
        log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
        return (
            self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    # ---- the model's reverse step ----------------------------------------------------------

    def split_output(
        self, model_output: torch.Tensor, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(T, D) mean output and (T, D) variance values (None for fixed variances) of a model
        output (T, 2D) / (T, D); ValueError when its width does not fit the variance type."""
        width = x.shape[-1] * (2 if self.learned else 1)
        if model_output.shape != (x.shape[0], width):
            raise ValueError(
                f"ddpm {self.var_type}: the model output has shape {tuple(model_output.shape)}, expected "
                f"({x.shape[0]}, {width}) (learned variances need model.learn_sigma=true)"
            )
        if not self.learned:
            return model_output, None
        mean_out, var_values = model_output.split(x.shape[-1], dim=-1)
        return mean_out, var_values

    def p_mean_variance(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> MeanVariance:
        """p(x_{t-1} | x_t) from the model's output at x (gaussian_diffusion.py 254-332).

        Learned variances interpolate the log-variance between the clipped posterior's (v = -1) and
        beta's (v = +1): log var = (v+1)/2 log beta_t + (1 - (v+1)/2) log posterior_var_t.
        """
        mean_out, var_values = self.split_output(model_output, x)
        if var_values is not None:
            min_log = self.extract(self.posterior_log_variance_clipped, t, x)
            max_log = self.extract(self.log_betas, t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            table, log_table = self.fixed_variance
            variance = self.extract(table, t, x).expand_as(x)
            log_variance = self.extract(log_table, t, x).expand_as(x)
        if self.mean_type == "start_x":
            pred_xstart = mean_out
        else:
            pred_xstart = self.predict_xstart_from_eps(x, t, mean_out)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return MeanVariance(mean, variance, log_variance, pred_xstart)

    # ---- training ---------------------------------------------------------------------------

    def vb_terms_bits(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor],
        image_t: torch.Tensor,
    ) -> torch.Tensor:
        """The VB term of each image in bits per value (N,) (gaussian_diffusion.py 682-713): the
        decoder NLL for images at t == 0, else KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)).

        `reduce` maps per-token values (T,) to per-image means (N,); image_t (N,) the images' indices.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_output, x_t, t, clip_denoised=False)
        kl = reduce(normal_kl(true_mean, true_log_variance, out.mean, out.log_variance).mean(dim=-1)) / LOG2
        nll = -discretized_gaussian_log_likelihood(x_start, out.mean, 0.5 * out.log_variance)
        decoder_nll = reduce(nll.mean(dim=-1)) / LOG2
        return torch.where(image_t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model_output: torch.Tensor,
        x_start: torch.Tensor,
        noise: torch.Tensor,
        t: torch.Tensor,
        reduce: Callable[[torch.Tensor], torch.Tensor],
        image_t: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The release's `training_losses` terms per image, each (N,) (gaussian_diffusion.py 715-787).

        model_output (T, D or 2D) is the model at x_t = q_sample(x_start, t, noise); t (T,) per
        token, image_t (N,) per image. Keys: `loss`, and for the MSE types `mse` and, with learned
        variances, `vb` (computed on the mean output detached: the VB trains the variance only).
        """
        x_t = self.q_sample(x_start, t, noise)
        if self.loss_type in ("kl", "rescaled_kl"):
            loss = self.vb_terms_bits(model_output, x_start, x_t, t, reduce, image_t)
            if self.loss_type == "rescaled_kl":
                loss = loss * self.num_timesteps
            return {"loss": loss}
        mean_out, var_values = self.split_output(model_output, x_start)
        terms: dict[str, torch.Tensor] = {}
        if var_values is not None:
            frozen = torch.cat([mean_out.detach(), var_values], dim=-1)
            terms["vb"] = self.vb_terms_bits(frozen, x_start, x_t, t, reduce, image_t)
            if self.loss_type == "rescaled_mse":
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.mean_type == "start_x" else noise
        terms["mse"] = reduce((target - mean_out).square().mean(dim=-1))
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def loss_type_of(config: DdpmConfig) -> str:
    """The release's create_diffusion choice: use_kl -> rescaled_kl, rescale_learned_sigmas -> rescaled_mse, else mse."""
    if config.use_kl:
        return "rescaled_kl"
    return "rescaled_mse" if config.rescale_learned_sigmas else "mse"


def create_diffusion(
    config: DdpmConfig, learn_sigma: bool, respacing: str | None = None
) -> GaussianDiffusion:
    """The release's `create_diffusion` (improved_diffusion/__init__.py): `respacing` None or "" keeps
    every step; "250" / "ddim50" / "10,20" keep those (fitscale sample --sampler ddpm --steps N)."""
    betas = named_beta_schedule(config.noise_schedule, config.diffusion_steps)
    kwargs = {
        "mean_type": "start_x" if config.predict_xstart else "epsilon",
        "var_type": "learned_range"
        if learn_sigma
        else ("fixed_small" if config.sigma_small else "fixed_large"),
        "loss_type": loss_type_of(config),
    }
    kept = space_timesteps(config.diffusion_steps, respacing or str(config.diffusion_steps))
    return GaussianDiffusion.spaced(betas, kept, **kwargs)


@torch.no_grad()
def p_sample_loop(
    model: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    step_noise: Callable[[int], torch.Tensor],
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Ancestral sampling from x_T (T, D) to x_0 (gaussian_diffusion.py p_sample / p_sample_loop).

    `model(x, t)` gets the original timestep (a 0-d float tensor, respace.py's _WrappedModel) and
    returns the (T, D or 2D) output; `step_noise(k)` the (T, D) noise of the k-th step (0 first,
    no noise is added at the last step, t = 0). The release samples with clip_denoised=False.
    """
    for k, i in enumerate(reversed(range(diffusion.num_timesteps))):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        output = model(x, torch.tensor(float(diffusion.timestep_map[i]), dtype=x.dtype, device=x.device))
        out = diffusion.p_mean_variance(output.to(x.dtype), x, t, clip_denoised)
        x = out.mean if i == 0 else out.mean + torch.exp(0.5 * out.log_variance) * step_noise(k)
    return x


__all__ = [
    "GaussianDiffusion",
    "MeanVariance",
    "approx_standard_normal_cdf",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "loss_type_of",
    "named_beta_schedule",
    "normal_kl",
    "p_sample_loop",
    "space_timesteps",
]
