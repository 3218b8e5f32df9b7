"""What the trainer does differently per `model.objective`: the per-image draws and the loss.

`flow` (FiTv2): timesteps in [0, 1] from `train.flow` and the velocity loss (fitscale.flow.loss).
`ddpm` (FiT v1): timestep indices uniform in [0, T) and the release's Gaussian-diffusion loss of
`train.ddpm` (fitscale.flow.ddpm_loss), whose `mse` and `vb` terms are logged beside the loss.
Both draw each image's time and noise from its own seed and return a FlowLossOutput normalised by
the step's global image count, so the trainer's step is the same code for both.
"""

from __future__ import annotations

import torch

from fitscale.config.model import ModelConfig
from fitscale.config.train import TrainConfig
from fitscale.data.batch import PackedBatch
from fitscale.flow import flow_loss, per_image_noise
from fitscale.flow.ddpm import create_diffusion
from fitscale.flow.ddpm_loss import ddpm_loss, per_image_ddpm_noise
from fitscale.flow.loss import FlowLossOutput

DDPM_TERMS = ("mse", "vb")  # the release's training_losses terms logged for model.objective=ddpm


class Objective:
    """The model's training objective: `diffusion` is the GaussianDiffusion of a ddpm model, None for flow."""

    def __init__(self, model: ModelConfig, train: TrainConfig):
        self.train = train
        self.diffusion = (
            create_diffusion(train.ddpm, model.learn_sigma) if model.objective == "ddpm" else None
        )

    def draw(self, micro: PackedBatch, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image timesteps (S,) and noise (T, C) of a CPU micro-batch (run seed, step, sample id)."""
        if self.diffusion is None:
            return per_image_noise(micro, self.train.seed, step, self.train.flow)
        return per_image_ddpm_noise(micro, self.train.seed, step, self.diffusion.num_timesteps)

    def loss(
        self,
        module: torch.nn.Module,
        batch: PackedBatch,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        global_images: int,
        hidden_after: int | None,
    ) -> FlowLossOutput:
        """The loss of one micro-batch on the device; `hidden_after` (REPA) applies to flow only."""
        flow = self.train.flow
        if self.diffusion is None:
            return flow_loss(module, batch, timesteps, noise, global_images, flow, hidden_after)
        return ddpm_loss(module, batch, timesteps, noise, global_images, flow, self.diffusion)

    def term_sums(self, out: FlowLossOutput, global_images: int, device: torch.device) -> torch.Tensor:
        """(len(DDPM_TERMS),) float64: this micro-batch's unweighted term sums / global image count
        (zeros for what the objective does not have), to be summed over micro-batches and ranks."""
        sums = torch.zeros(len(DDPM_TERMS), dtype=torch.float64, device=device)
        for k, name in enumerate(DDPM_TERMS):
            if name in out.terms:  # device tensors: no host sync
                sums[k] = out.terms[name].double().sum() / global_images
        return sums

    def terms(self, sums: list[float]) -> dict[str, float] | None:
        """The step's mean terms by name (`vb` only with learned variances and an MSE loss type; none
        for the KL types, whose loss is the only term); None for flow."""
        if self.diffusion is None:
            return None
        if not self.diffusion.loss_type.endswith("mse"):
            return {}
        names = DDPM_TERMS if self.diffusion.learned else ("mse",)
        return {name: value for name, value in zip(DDPM_TERMS, sums) if name in names}


__all__ = ["DDPM_TERMS", "Objective"]
