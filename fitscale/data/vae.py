"""The VAE between pictures and latents: one place that finds, checks and loads a local
diffusers `AutoencoderKL`, and that turns its outputs into the latents fitscale trains on and back.

Latents are the VAE's posterior mean times its `scaling_factor` (the release's 0.18215 for
sd-vae-ft-ema), so `encode_pixels` then `decode_latents` is the VAE's own round trip. A token
covers `PIXELS_PER_TOKEN` pixels a side: the VAE downsamples by 8 and a patch is 2 x 2 latent pixels.
"""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

PIXELS_PER_TOKEN = 16  # 8x VAE downsampling times patch size 2
VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def check_vae_folder(path: str | Path, latent_channels: int | None = None) -> dict:
    """The config of a local AutoencoderKL folder (what `save_pretrained` writes), checked before
    any work starts. Raises FileNotFoundError / ValueError naming the path and what is wrong."""
    folder = Path(path)
    hint = "expected an AutoencoderKL saved with save_pretrained (config.json and its weights)"
    if not folder.is_dir():
        raise FileNotFoundError(f"--vae {path}: no such folder; {hint}")
    config_file = folder / "config.json"
    if not config_file.is_file():
        inside = " (a diffusers pipeline: pass its vae/ subfolder)" if (folder / "vae").is_dir() else ""
        raise ValueError(f"--vae {path}: no config.json in the folder{inside}; {hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"--vae {path}: config.json is not valid JSON ({error}); {hint}") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":
        raise ValueError(
            f"--vae {path}: config.json describes {kind or 'no diffusers model'}, not an AutoencoderKL"
        )
    if not any((folder / name).is_file() for name in VAE_WEIGHT_FILES):
        raise ValueError(f"--vae {path}: no weights file ({' or '.join(VAE_WEIGHT_FILES)}); {hint}")
    channels = config.get("latent_channels", 4)
    if latent_channels is not None and channels != latent_channels:
        raise ValueError(
            f"--vae {path}: it decodes {channels}-channel latents but the model makes {latent_channels}-channel ones"
        )
    blocks = config.get("block_out_channels")
    if blocks is not None and len(blocks) != 4:
        raise ValueError(f"--vae {path}: downsamples by 2^{len(blocks) - 1}, fitscale needs 8")
    return config


def load_vae(
    path: str | Path,
    device: torch.device | str,
    latent_channels: int | None = None,
    purpose: str = "decoding",
):
    """A checked local AutoencoderKL in eval mode on `device` (nothing is downloaded)."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError(f"{purpose} needs diffusers: pip install 'fitscale[images]'") from error
    check_vae_folder(path, latent_channels)
    try:
        # low_cpu_mem_usage needs accelerate; without it diffusers would warn, then load fully anyway.
        vae = AutoencoderKL.from_pretrained(str(path), low_cpu_mem_usage=find_spec("accelerate") is not None)
    except (OSError, ValueError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"--vae {path}: cannot be loaded as an AutoencoderKL ({reason})") from error
    return vae.to(device).eval()


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (N, 3, H, W) in [-1, 1] -> latents (N, C, H/8, W/8): posterior mean x scaling_factor."""
    return vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: list[torch.Tensor]) -> list[np.ndarray]:
    """Latents (C, h, w), scaled as in training -> uint8 (8h, 8w, 3) pictures, one by one."""
    device = next(vae.parameters()).device
    pictures = []
    for latent in latents:
        pixels = vae.decode(latent[None].to(device, vae.dtype) / vae.config.scaling_factor).sample[0]
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pictures.append(pixels.permute(1, 2, 0).cpu().numpy())
    return pictures
