"""The DDPM loss of a packed batch (model.objective=ddpm, FiT v1), normalised like the flow loss.

The release draws t = torch.randint(0, num_timesteps, (B,)) and noise from one RNG stream and
trains on training_losses(...)["loss"].mean() (train_fit.py). Here, as for the flow loss
(fitscale.flow.loss), each image draws its timestep index and its noise from its own generator
seeded by (run seed, step, sample id), so the step does not depend on how its images are spread
over ranks and micro-batches, and each rank returns sum_i w_i L_i / N_global: the reduction across
ranks makes the step loss the mean of the release's per-image `loss` over the step's images.
"""

from __future__ import annotations

from functools import partial

import torch

from fitscale.config.train import FlowConfig
from fitscale.data.batch import PackedBatch
from fitscale.flow.ddpm import GaussianDiffusion
from fitscale.flow.loss import (
    FlowLossOutput,
    check_loss_inputs,
    model_on_batch,
    per_image_draws,
    per_image_mean,
    per_token,
    weighted_image_sum,
)


def per_image_ddpm_noise(
    batch: PackedBatch, seed: int, step: int, num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestep indices (S,) float32 in [0, num_timesteps) and noise (T, C) for a CPU batch, each
    image's drawn uniformly from its own seed (fitscale.flow.loss.per_image_draws). Padding segments
    get index 0 and zero noise."""

    def draw_index(generator: torch.Generator) -> float:
        return float(torch.randint(0, num_timesteps, (1,), generator=generator))

    return per_image_draws(batch, seed, step, draw_index, padding_time=0.0)


def check_indices(timesteps: torch.Tensor, num_timesteps: int) -> None:
    """ValueError naming the first timestep that is not an integer index in [0, num_timesteps) (CPU only)."""
    if timesteps.device.type != "cpu":
        return
    bad = torch.nonzero(~((timesteps >= 0) & (timesteps < num_timesteps) & (timesteps == timesteps.round())))
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(
            f"ddpm loss: timesteps[{i}]={float(timesteps[i])} is not an integer index in [0, {num_timesteps})"
        )


def ddpm_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    global_num_images: int,
    flow: FlowConfig,
    diffusion: GaussianDiffusion,
) -> FlowLossOutput:
    """Forward the model on x_t of a packed batch (on the model's device) and score it as the release.

    timesteps (S,) float indices and noise (T, C) as per_image_ddpm_noise makes them; the model
    reads the float index. `per_image` holds each image's release `loss` (mse + vb), `terms` its
    `mse` and `vb` (N,) detached; `timesteps` are returned as t / num_timesteps in [0, 1) for the
    timestep buckets. `flow.loss_weighting` weighs images as for the flow loss. Errors: ValueError.
    """
    check_loss_inputs(batch, torch.zeros_like(timesteps), noise)  # shapes; indices, not times, checked next
    check_indices(timesteps, diffusion.num_timesteps)
    tokens = batch.tokens.float()  # (T, C)
    t_index = timesteps.long()  # (S,)
    t_tokens = per_token(t_index, batch)  # (T,)
    x_t = diffusion.q_sample(tokens, t_tokens, noise)
    output = model_on_batch(model, x_t, timesteps, batch)  # (T, C) or (T, 2C) with learned variances
    reduce = partial(_image_means, batch=batch)
    image_t = t_index[: batch.num_images]
    terms = diffusion.training_losses(output.float(), tokens, noise, t_tokens, reduce, image_t)
    per_image = terms["loss"]
    loss = weighted_image_sum(per_image, batch, flow) / global_num_images
    return FlowLossOutput(
        loss=loss,
        per_image=per_image.detach(),
        timesteps=(timesteps[: batch.num_images] / diffusion.num_timesteps).detach(),
        terms={name: value.detach() for name, value in terms.items() if name != "loss"},
    )


def _image_means(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    return per_image_mean(values, batch)[0]


__all__ = ["check_indices", "ddpm_loss", "per_image_ddpm_noise"]
