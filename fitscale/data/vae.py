"""The VAE between pictures and latents: one place that finds, checks and loads a local
diffusers `AutoencoderKL`, and that turns its outputs into the latents fitscale trains on and back.

Latents are the VAE's posterior mean x, normalised as its config says (`LatentNormalisation`):
z = (x - mean) * scaling_factor / std, with mean = `shift_factor` (SD3, FLUX) or the per-channel
`latents_mean` and std = `latents_std` (both as diffusers' pipelines undo them), or just
x * scaling_factor (the release's sd-vae-ft-ema: 0.18215). `encode_pixels` then `decode_latents`
is the VAE's own round trip. A dataset written from images records its VAE's factors in
`fitscale.json` (`vae`), and `fitscale sample --vae` compares them with the VAE it is given.
A token covers `PIXELS_PER_TOKEN` pixels a side: the VAE downsamples by 8 and a patch is 2 x 2
latent pixels.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from fitscale.errors import UserError

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
        raise UserError(f"--vae {path}: no config.json in the folder{inside}; {hint}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--vae {path}: config.json is not valid JSON ({error}); {hint}") from None
    kind = config.get("_class_name") if isinstance(config, dict) else None
    if kind != "AutoencoderKL":
        raise UserError(
            f"--vae {path}: config.json describes {kind or 'no diffusers model'}, not an AutoencoderKL"
        )
    if not any((folder / name).is_file() for name in VAE_WEIGHT_FILES):
        raise UserError(f"--vae {path}: no weights file ({' or '.join(VAE_WEIGHT_FILES)}); {hint}")
    channels = config.get("latent_channels", 4)
    if latent_channels is not None and channels != latent_channels:
        raise UserError(
            f"--vae {path}: it decodes {channels}-channel latents but the model makes {latent_channels}-channel ones"
        )
    blocks = config.get("block_out_channels")
    if blocks is not None and len(blocks) != 4:
        raise UserError(f"--vae {path}: downsamples by 2^{len(blocks) - 1}, fitscale needs 8")
    LatentNormalisation.from_config(config, f"--vae {path}")  # refuses factors it cannot apply
    return config


@dataclass(frozen=True)
class LatentNormalisation:
    """How a VAE's latents are scaled for the diffusion model: z = (x - mean) * scaling_factor / std.

    `shift_factor` (a scalar mean, SD3 / FLUX VAEs) or `latents_mean` and `latents_std` (per
    channel, as diffusers' SD-XL pipeline reads them), or neither (SD 1.x: scaling only).
    """

    scaling_factor: float = 1.0
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    @classmethod
    def from_config(cls, config: dict, where: str) -> LatentNormalisation:
        """From an AutoencoderKL config (a dict); ValueError naming `where` for factors that do not fit."""
        scaling = config.get("scaling_factor", 0.18215)  # diffusers' default
        shift = config.get("shift_factor")
        mean, std = config.get("latents_mean"), config.get("latents_std")
        channels = config.get("latent_channels", 4)
        if not isinstance(scaling, (int, float)) or not math.isfinite(scaling) or scaling <= 0:
            raise UserError(f"{where}: scaling_factor={scaling!r}, expected a positive number")
        if shift is not None and (mean is not None or std is not None):
            raise UserError(
                f"{where}: sets both shift_factor={shift} and latents_mean/latents_std; "
                "fitscale applies one or the other, not both (set the unused one to null in config.json)"
            )
        if (mean is None) != (std is None):
            raise UserError(f"{where}: latents_mean and latents_std must be set together, got only one")
        for name, values in (("latents_mean", mean), ("latents_std", std)):
            if values is not None and (not isinstance(values, (list, tuple)) or len(values) != channels):
                raise UserError(
                    f"{where}: {name} must list {channels} values (latent_channels), got {values!r}"
                )
        if std is not None and min(std) <= 0:
            raise UserError(f"{where}: latents_std must be positive, got {std}")
        return cls(
            float(scaling),
            None if shift is None else float(shift),
            None if mean is None else tuple(float(v) for v in mean),
            None if std is None else tuple(float(v) for v in std),
        )

    def as_dict(self) -> dict:
        """The factors as plain JSON-able data, as recorded in a dataset's fitscale.json."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def _mean_std(self, latents: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor | float]:
        """Broadcastable over (..., C, h, w)."""
        if self.latents_mean is None:
            return (self.shift_factor or 0.0), 1.0
        shape = (-1, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=latents.dtype, device=latents.device).view(shape)
        std = torch.tensor(self.latents_std, dtype=latents.dtype, device=latents.device).view(shape)
        return mean, std

    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (..., C, h, w) -> what the model is trained on."""
        mean, std = self._mean_std(latents)
        return (latents - mean) * self.scaling_factor / std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalise`: model latents (..., C, h, w) -> what the VAE decodes."""
        mean, std = self._mean_std(latents)
        return latents * std / self.scaling_factor + mean


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
        raise UserError(f"--vae {path}: cannot be loaded as an AutoencoderKL ({reason})") from error
    return vae.to(device).eval()


def describe_factors(factors: dict) -> str:
    """The set normalisation factors of a dict as 'name=value, ...' (the path left out), for messages."""
    return ", ".join(f"{k}={v}" for k, v in factors.items() if v is not None and k != "path")


def check_vae_matches_dataset(vae_path: str | Path, dataset: str | Path) -> None:
    """The VAE at `vae_path` normalises latents as the one that encoded `dataset` did.

    Checked only where the dataset records its VAE (`fitscale data from-images` writes `vae` in
    fitscale.json); ValueError naming both VAEs and their factors otherwise.
    """
    meta_file = Path(dataset) / "fitscale.json"
    if not meta_file.is_file():
        return
    recorded = json.loads(meta_file.read_text()).get("vae")
    if not isinstance(recorded, dict):
        return
    where = f"--vae {vae_path}"
    given = LatentNormalisation.from_config(check_vae_folder(vae_path), where).as_dict()
    trained = {key: recorded.get(key) for key in given}
    if given != trained:
        raise UserError(
            f"{where} normalises latents with {describe_factors(given)}, but the model was trained on "
            f"{dataset}, encoded by {recorded.get('path')} with {describe_factors(trained)}; "
            "decode with that VAE (or one with the same factors)"
        )


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (N, 3, H, W) in [-1, 1] -> latents (N, C, H/8, W/8): the posterior mean, normalised."""
    normalisation = LatentNormalisation.from_config(dict(vae.config), "the VAE")
    return normalisation.normalise(vae.encode(pixels).latent_dist.mean)


@torch.no_grad()
def decode_latents(vae, latents: list[torch.Tensor]) -> list[np.ndarray]:
    """Latents (C, h, w), scaled as in training -> uint8 (8h, 8w, 3) pictures, one by one."""
    device = next(vae.parameters()).device
    normalisation = LatentNormalisation.from_config(dict(vae.config), "the VAE")
    pictures = []
    for latent in latents:
        raw = normalisation.denormalise(latent[None].to(device, torch.float32)).to(vae.dtype)
        pixels = vae.decode(raw).sample[0]
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pictures.append(pixels.permute(1, 2, 0).cpu().numpy())
    return pictures
