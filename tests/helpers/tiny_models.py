"""Tiny randomly initialised networks for the sampling and evaluation tests: the `tiny` FiT with its
output layer perturbed (the released init zeroes it, which would sample noise only) and a small
diffusers AutoencoderKL that upsamples by 8 like the Stable Diffusion VAE the paper uses."""

from __future__ import annotations

import torch

from fitscale.models import build_model


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """The `tiny` FiT (reference attention) in eval mode, every parameter moved by N(0, 0.05^2)."""
    torch.manual_seed(seed)
    model = build_model("tiny", attn_backend="reference")
    with torch.no_grad():
        for param in model.parameters():  # the released init zeroes the output layer
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def tiny_vae(latent_channels: int = 4, **factors):
    """A 4-block AutoencoderKL (8 channels per block, so 8x down/upsampling), seeded with 0.
    `factors`: the latent normalisation (scaling_factor, shift_factor, latents_mean, latents_std)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        norm_num_groups=4,
        layers_per_block=1,
        **factors,
    )
