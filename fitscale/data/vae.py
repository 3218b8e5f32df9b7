"""The VAE between pictures and latents: one place that finds, checks and loads a local
diffusers autoencoder (`AutoencoderKL`, `AutoencoderDC` or one registered in
fitscale/data/autoencoders.py), and that turns its outputs into the latents fitscale trains on and back.

Latents are the autoencoder's deterministic encoding x (the posterior mean of an AutoencoderKL), normalised as its config says (`LatentNormalisation`):
z = (x - mean) * scaling_factor / std, with mean = `shift_factor` (SD3, FLUX) or the per-channel
`latents_mean` and std = `latents_std` (both as diffusers' pipelines undo them), or just
x * scaling_factor (the release's sd-vae-ft-ema: 0.18215). `encode_pixels` then `decode_latents`
is the VAE's own round trip. A dataset written from images records its VAE's factors in
`fitscale.json` (`vae`), and `fitscale sample --vae` compares them with the VAE it is given.
A token covers downsample x patch_size pixels a side: `PIXELS_PER_TOKEN` (16) for an 8x VAE and
2 x 2 patches, 32 for DC-AE f32 with 1 x 1 patches (`pixels_per_token`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from fitscale.data.autoencoders import autoencoder_kind, default_patch_size
from fitscale.errors import UserError

PIXELS_PER_TOKEN = 16  # 8x VAE downsampling times patch size 2
VAE_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def check_vae_folder(path: str | Path, latent_channels: int | None = None) -> dict:
    """The config of a local autoencoder folder (what `save_pretrained` writes), checked before
    any work starts. Raises FileNotFoundError / ValueError naming the path and what is wrong: no
    folder, no config.json, a class fitscale does not know, no weights, another channel count than
    `latent_channels`, normalisation factors it cannot apply."""
    folder = Path(path)
    hint = "expected a diffusers autoencoder saved with save_pretrained (config.json and its weights)"
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
    autoencoder_kind(config.get("_class_name") if isinstance(config, dict) else None, f"--vae {path}")
    if not any((folder / name).is_file() for name in VAE_WEIGHT_FILES):
        raise UserError(f"--vae {path}: no weights file ({' or '.join(VAE_WEIGHT_FILES)}); {hint}")
    channels = config.get("latent_channels", 4)
    if latent_channels is not None and channels != latent_channels:
        raise UserError(
            f"--vae {path}: it decodes {channels}-channel latents but the model makes {latent_channels}-channel ones"
        )
    LatentNormalisation.from_config(config, f"--vae {path}")  # refuses factors it cannot apply
    return config


def vae_downsample(config: dict) -> int:
    """Pixels per latent pixel a side of a checked autoencoder config (8 for SD / FLUX, 32 for DC-AE f32)."""
    return autoencoder_kind(config.get("_class_name"), "the autoencoder").downsample(config)


def vae_patch_size(config: dict) -> int:
    """The default patch side for latents of this autoencoder (autoencoders.default_patch_size)."""
    return default_patch_size(vae_downsample(config))


def vae_record(path: str | Path, config: dict) -> dict:
    """What a dataset records of the autoencoder that encoded it (fitscale.json `vae`): its folder,
    class, latent channels, downsampling factor and latent normalisation."""
    normalisation = LatentNormalisation.from_config(config, f"--vae {path}")
    return {
        "path": str(path),
        "class": config.get("_class_name"),
        "latent_channels": int(config.get("latent_channels", 4)),
        "downsample": vae_downsample(config),
        **normalisation.as_dict(),
    }


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
        """From an autoencoder config (a dict); ValueError naming `where` for factors that do not fit."""
        kind = autoencoder_kind(config.get("_class_name") or "AutoencoderKL", where)
        scaling = config.get("scaling_factor", kind.default_scaling)  # the class's own default
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
    """A checked local autoencoder in eval mode on `device` (nothing is downloaded)."""
    config = check_vae_folder(path, latent_channels)
    try:
        model_class = autoencoder_kind(config["_class_name"], f"--vae {path}").model_class()
    except ImportError as error:
        raise ImportError(f"{purpose} needs diffusers: pip install 'fitscale[images]'") from error
    try:
        # low_cpu_mem_usage needs accelerate; without it diffusers would warn, then load fully anyway.
        vae = model_class.from_pretrained(str(path), low_cpu_mem_usage=find_spec("accelerate") is not None)
    except (OSError, ValueError, RuntimeError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"--vae {path}: cannot be loaded as an {config['_class_name']} ({reason})") from error
    return vae.to(device).eval()


def describe_factors(factors: dict) -> str:
    """The set normalisation factors of a dict as 'name=value, ...' (the path left out), for messages."""
    return ", ".join(f"{k}={v}" for k, v in factors.items() if v is not None and k != "path")


def recorded_vae(dataset: str | Path) -> dict | None:
    """The `vae` record of a dataset's fitscale.json (None when it has none: not written from images)."""
    meta_file = Path(dataset) / "fitscale.json"
    if not meta_file.is_file():
        return None
    recorded = json.loads(meta_file.read_text()).get("vae")
    return recorded if isinstance(recorded, dict) else None


def check_vae_matches_dataset(vae_path: str | Path, dataset: str | Path) -> None:
    """The autoencoder at `vae_path` is of the class, channels and downsampling of the one that
    encoded `dataset`, and normalises latents as it did.

    Checked only where the dataset records its VAE (`fitscale data from-images` writes `vae` in
    fitscale.json); ValueError naming both autoencoders and what differs otherwise.
    """
    recorded = recorded_vae(dataset)
    if recorded is None:
        return
    where = f"--vae {vae_path}"
    config = check_vae_folder(vae_path)
    mine = vae_record(vae_path, config)
    for key in ("class", "latent_channels", "downsample"):  # recorded since these were added
        if key in recorded and recorded[key] != mine[key]:
            raise UserError(
                f"{where} is an {mine['class']} with {mine['latent_channels']} channels at "
                f"{mine['downsample']}x, but the model was trained on {dataset}, encoded by "
                f"{recorded.get('path')}, an {recorded['class']} with {recorded.get('latent_channels')} "
                f"channels at {recorded.get('downsample')}x; decode with that autoencoder"
            )
    given = LatentNormalisation.from_config(config, where).as_dict()
    trained = {key: recorded.get(key) for key in given}
    if given != trained:
        raise UserError(
            f"{where} normalises latents with {describe_factors(given)}, but the model was trained on "
            f"{dataset}, encoded by {recorded.get('path')} with {describe_factors(trained)}; "
            "decode with that VAE (or one with the same factors)"
        )


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels (N, 3, H, W) in [-1, 1] -> latents (N, C, H/f, W/f): the deterministic encoding (an
    AutoencoderKL's posterior mean), normalised; computed in the autoencoder's dtype."""
    config = dict(vae.config)
    normalisation = LatentNormalisation.from_config(config, "the VAE")
    kind = autoencoder_kind(config.get("_class_name", type(vae).__name__), "the VAE")
    return normalisation.normalise(kind.encode(vae, pixels.to(vae.dtype)).float())


@torch.no_grad()
def decode_latents(vae, latents: list[torch.Tensor]) -> list[np.ndarray]:
    """Latents (C, h, w), scaled as in training -> uint8 (f*h, f*w, 3) pictures, one by one."""
    device = next(vae.parameters()).device
    config = dict(vae.config)
    normalisation = LatentNormalisation.from_config(config, "the VAE")
    kind = autoencoder_kind(config.get("_class_name", type(vae).__name__), "the VAE")
    pictures = []
    for latent in latents:
        raw = normalisation.denormalise(latent[None].to(device, torch.float32)).to(vae.dtype)
        pixels = kind.decode(vae, raw)[0]
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pictures.append(pixels.permute(1, 2, 0).cpu().numpy())
    return pictures
