"""The image autoencoders fitscale encodes with and decodes through, by diffusers class name.

A dataset written from images records which autoencoder made it (`fitscale.json` `vae`: class,
latent channels, downsampling factor and the latent normalisation), so training takes the
model's `in_channels` and `patch_size` from the dataset and sampling refuses another autoencoder.

Supported out of the box (local folders written by `save_pretrained`; nothing is downloaded):
- `AutoencoderKL`: SD 1.x / SD-XL (4 channels, 8x), FLUX / SD3 (16 channels, 8x, `shift_factor`).
  Latents are the posterior mean.
- `AutoencoderDC`: DC-AE, e.g. f32c32 (32 channels, 32x): deterministic, `encode` returns the
  latent itself.

Another autoencoder is one `register_autoencoder(AutoencoderKind(...))` call (see docs/data.md):
its diffusers class name (the `_class_name` of its config.json), how to read its downsampling
factor from its config, `encode(model, pixels) -> latents` and `decode(model, latents) -> pixels`,
pixels (N, 3, H, W) in [-1, 1], latents (N, C, H/f, W/f) before normalisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fitscale.errors import UserError


@dataclass(frozen=True)
class AutoencoderKind:
    """How fitscale uses one diffusers autoencoder class.

    `downsample(config)`: pixels per latent pixel a side, from the model's config.json (a dict).
    `encode(model, pixels)`: (N, 3, H, W) in [-1, 1] -> raw latents (N, C, H/f, W/f), deterministic.
    `decode(model, latents)`: raw latents -> pixels (N, 3, H, W), roughly in [-1, 1].
    `default_scaling`: the scaling_factor the class assumes when its config has none.
    """

    class_name: str
    downsample: Callable[[dict], int]
    encode: Callable[[Any, torch.Tensor], torch.Tensor]
    decode: Callable[[Any, torch.Tensor], torch.Tensor]
    default_scaling: float = 1.0

    def model_class(self):
        """The diffusers class (ImportError naming the extra when diffusers is missing)."""
        try:
            import diffusers
        except ImportError as error:
            raise ImportError("autoencoders need diffusers: pip install 'fitscale[images]'") from error
        return getattr(diffusers, self.class_name)


AUTOENCODERS: dict[str, AutoencoderKind] = {}


def register_autoencoder(kind: AutoencoderKind) -> AutoencoderKind:
    """Make `kind` usable by `fitscale data from-images --vae` and `fitscale sample --vae`."""
    AUTOENCODERS[kind.class_name] = kind
    return kind


def autoencoder_kind(class_name: str | None, where: str) -> AutoencoderKind:
    """The registered kind of `class_name`; ValueError naming `where` and the known classes."""
    kind = AUTOENCODERS.get(class_name or "")
    if kind is None:
        known = ", ".join(sorted(AUTOENCODERS))
        raise UserError(
            f"{where}: config.json describes {class_name or 'no diffusers model'}, not an autoencoder "
            f"fitscale knows ({known}); register one with fitscale.data.autoencoders.register_autoencoder"
        )
    return kind


def _stages(config: dict, key: str, default: tuple) -> int:
    return 2 ** (len(config.get(key) or default) - 1)


register_autoencoder(
    AutoencoderKind(
        "AutoencoderKL",
        downsample=lambda config: _stages(config, "block_out_channels", (64,)),
        encode=lambda model, pixels: model.encode(pixels).latent_dist.mean,
        decode=lambda model, latents: model.decode(latents).sample,
        default_scaling=0.18215,
    )
)
register_autoencoder(
    AutoencoderKind(
        "AutoencoderDC",
        downsample=lambda config: _stages(config, "encoder_block_out_channels", (0,) * 6),
        encode=lambda model, pixels: model.encode(pixels).latent,
        decode=lambda model, latents: model.decode(latents).sample,
        default_scaling=1.0,
    )
)


def default_patch_size(downsample: int) -> int:
    """The patch side that makes a token cover at least 16 pixels a side (2 for 8x, 1 for 16x/32x),
    so a 256x256 image is at most 256 tokens (64 with a 32x autoencoder such as DC-AE f32c32)."""
    return max(1, 16 // downsample)
