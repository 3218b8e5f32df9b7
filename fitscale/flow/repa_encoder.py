"""The frozen encoder of REPA (fitscale.flow.repa): any timm ViT, from a local weights file.

Each image of a packed batch is encoded on its own grid: its pixels (fitscale.data.pixels, the
variant the latent uses) are resized to rows*p x cols*p, p the encoder's patch size, so that the
encoder's patch grid is the image's latent token grid, and timm's `dynamic_img_size` interpolates
the position embedding to that grid per image. The prefix tokens (class, registers) are dropped;
the remaining (rows*cols, E) patch features, normalised by the encoder's final norm as REPA's
DINOv2 features are, meet the image's tokens in order (both row-major). Images of one grid and flip
are encoded together.

The encoder is not part of the trained module tree: not sharded, not in checkpoints, not in the
trainable parameters or MFU; its time per step is measured and logged on its own.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fitscale.config.errors import ConfigError
from fitscale.data.batch import PackedBatch


def create_encoder(repa, device: str | torch.device = "cpu", num_classes: int = 0):
    """The timm model `repa.encoder` on `device` (meta: nothing allocated), with a classifier head of
    `num_classes` (0: none, the frozen encoder's case). ConfigError names an unknown encoder."""
    try:
        import timm
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ConfigError("train.repa.encoder needs timm: pip install 'fitscale[repa]'") from error
    if not timm.is_model(repa.encoder):
        raise ConfigError(
            f"train.repa.encoder: {repa.encoder!r} is not a timm model; name one of timm.list_models(), "
            "e.g. vit_base_patch14_dinov2 (DINOv2-B)"
        )
    args = {
        "pretrained": False,
        "num_classes": num_classes,
        "dynamic_img_size": True,
        **dict(repa.encoder_args),
    }
    try:
        with torch.device(device):
            return timm.create_model(repa.encoder, **args)
    except TypeError as error:
        raise ConfigError(
            f"train.repa.encoder: {repa.encoder!r} cannot be built with {args} ({error}); it must be a timm "
            "ViT (dynamic_img_size), and train.repa.encoder_args its keyword arguments"
        ) from error


def encoder_patch_size(model) -> int:
    """The square patch size of a timm ViT; ConfigError when it has none (its patch grid could not
    tile the latent grid)."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None or len(set(patch)) != 1 or not hasattr(model, "num_prefix_tokens"):
        raise ConfigError(
            f"train.repa.encoder: {type(model).__name__} has no square patch embedding (patch_size={patch}), "
            "so its patch grid cannot tile the latent token grid; name a timm ViT"
        )
    return int(patch[0])


def encoder_dim(repa) -> int:
    """Width E of the encoder's features (built on the meta device: nothing allocated or read)."""
    model = create_encoder(repa, "meta")
    encoder_patch_size(model)
    return int(model.num_features)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or .pt/.pth/.bin read weights-only (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"train.repa.encoder_weights: {path} is not a file; point it at the encoder's state dict"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def encoder_input(
    pixels: torch.Tensor, rows: int, cols: int, patch: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, rows*patch, cols*patch): resized (bicubic, antialiased)
    so that the encoder's patch grid is the rows x cols token grid, normalised by mean/std (1, 3, 1, 1)."""
    images = pixels.permute(0, 3, 1, 2).float() / 255.0
    size = (rows * patch, cols * patch)
    if tuple(images.shape[-2:]) != size:
        images = torch.nn.functional.interpolate(images, size=size, mode="bicubic", antialias=True)
    return (images - mean) / std


def normalisation(model) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, 3, 1, 1) mean and std a timm model's pretrained config names (0.5 each when absent)."""
    config = getattr(model, "pretrained_cfg", {}) or {}
    mean = torch.tensor(config.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(config.get("std", (0.5, 0.5, 0.5)), dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


class FrozenEncoder:
    """`repa.encoder` with the weights of `repa.encoder_weights`, frozen, in eval mode on `device`.

    `features(batch, store)` returns the (T, E) target of every token of a packed batch. Raises
    ConfigError (one line naming the field) for an unknown encoder, weights that do not match it,
    or an encoder whose patches do not tile the latent grid of the pixel store.
    """

    def __init__(self, repa, device: torch.device, pixels_per_token: int | None = None):
        self.model = create_encoder(repa, "cpu")
        self.patch = encoder_patch_size(self.model)
        if pixels_per_token is not None and pixels_per_token < self.patch:
            raise ConfigError(
                f"train.repa.encoder: {repa.encoder} has {self.patch}-pixel patches but the dataset's pixels "
                f"hold {pixels_per_token} per latent token, so each patch would be upsampled; write the pixels at "
                f">= {self.patch} pixels per token or pick an encoder with smaller patches"
            )
        state = read_state_dict(repa.encoder_weights)
        self._check_matches(repa, state)
        self.model.load_state_dict(state)
        self.model.requires_grad_(False).eval().to(device)
        self.mean, self.std = normalisation(self.model)
        self.device = device
        self.dim = int(self.model.num_features)
        self.seconds = 0.0  # encoder time since the last `take_seconds`

    def _check_matches(self, repa, state: dict[str, torch.Tensor]) -> None:
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shapes = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
        if missing or unexpected or shapes:
            parts = []
            for label, names in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("of another shape", shapes),
            ):
                if names:
                    parts.append(f"{len(names)} tensors {label} (e.g. {names[0]})")
            raise ConfigError(
                f"train.repa.encoder_weights: {repa.encoder_weights} does not match encoder {repa.encoder!r}: "
                f"{', '.join(parts)}; pass that encoder's state dict (without its classifier head)"
            )

    def take_seconds(self) -> float:
        """Encoder seconds since the last call (for the log), then reset."""
        seconds, self.seconds = self.seconds, 0.0
        return seconds

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """uint8 (B, H, W, 3) pixels of images on a rows x cols grid -> (B, rows*cols, E) float32 features
        (computed in bf16 autocast on CUDA, as REPA runs DINOv2; fp32 on CPU)."""
        images = encoder_input(pixels, rows, cols, self.patch, self.mean, self.std).to(self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            tokens = self.model.forward_features(images)  # (B, prefix + rows*cols, E)
        return tokens[:, self.model.num_prefix_tokens :].float()

    def features(self, batch: PackedBatch, store) -> torch.Tensor:
        """(T, E) float32 on the encoder's device: each real image's patch features on its own grid
        (images of one grid and flip encoded together), zeros for padding tokens. `batch` on the CPU."""
        started = time.perf_counter()
        sizes = batch.sizes.tolist()
        ids = batch.sample_ids.tolist()
        flips = batch.flips.tolist() if batch.flips is not None else [0] * batch.num_segments
        starts = batch.cu_seqlens.tolist()
        out = torch.zeros(batch.num_tokens, self.dim, dtype=torch.float32, device=self.device)
        groups: dict[tuple[int, int, int], list[int]] = {}
        for index in range(batch.num_images):
            groups.setdefault((sizes[index][0], sizes[index][1], int(flips[index] == 1)), []).append(index)
        for (rows, cols, flip), members in groups.items():
            pixels = torch.stack(
                [torch.from_numpy(store.image(ids[i], rows, cols, bool(flip))) for i in members]
            )
            encoded = self.encode(pixels, rows, cols)  # (B, rows*cols, E)
            for i, values in zip(members, encoded):
                out[starts[i] : starts[i + 1]] = values
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - started
        return out
