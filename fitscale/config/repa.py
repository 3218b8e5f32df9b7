"""`train.repa`: representation alignment (REPA) of the model's hidden states with a frozen encoder.

The loss (fitscale.flow.repa) projects the hidden states after block `block` with a per-token MLP
and scores them against the patch features of a frozen vision encoder (any timm ViT, weights from
a local file, nothing downloaded) run on each image's own pixels, its patch grid equal to the
image's latent token grid. REPA's published setting for DINOv2-B is the default: weight 0.5,
a 3-layer SiLU projector 2048 wide (Yu et al. 2024, sihyun-yu/REPA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fitscale.config.errors import ConfigError


@dataclass
class RepaConfig:
    """Representation alignment: off unless `encoder` names a timm model."""

    encoder: str | None = None
    """timm model name of the frozen encoder, e.g. vit_base_patch14_dinov2 (DINOv2-B); None: REPA off."""
    encoder_weights: str | None = None
    """Local file of the encoder's state dict (.safetensors, or .pt/.pth/.bin read weights-only)."""
    encoder_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of timm.create_model for the encoder (e.g. patch_size, embed_dim, depth)."""
    block: int = 8
    """Align the hidden states after this block (1-based, 1..model depth)."""
    projector_width: int = 2048
    """Hidden width of the projector MLP."""
    projector_depth: int = 3
    """Linear layers of the projector (SiLU between them); the last maps to the encoder's width."""
    weight: float = 0.5
    """Weight of the alignment loss added to the flow loss."""
    until_step: int = 0
    """Turn the alignment off from this step on (its weight becomes 0); 0 keeps it on throughout."""

    @property
    def enabled(self) -> bool:
        """Whether REPA runs (an encoder is named)."""
        return bool(self.encoder)

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if not self.encoder_weights:
            raise ConfigError(
                f"train.repa.encoder_weights: encoder {self.encoder!r} needs a local weights file; "
                "set train.repa.encoder_weights=PATH (nothing is downloaded)"
            )
        if self.block < 1:
            raise ConfigError(f"train.repa.block: must be >= 1 (blocks count from 1), got {self.block}")
        if self.projector_width < 1:
            raise ConfigError(f"train.repa.projector_width: must be >= 1, got {self.projector_width}")
        if self.projector_depth < 1:
            raise ConfigError(f"train.repa.projector_depth: must be >= 1, got {self.projector_depth}")
        if not self.weight >= 0:
            raise ConfigError(f"train.repa.weight: must be >= 0, got {self.weight}")
        if self.until_step < 0:
            raise ConfigError(f"train.repa.until_step: must be >= 0 (0 = never off), got {self.until_step}")

    def weight_at(self, step: int) -> float:
        """The loss weight at optimizer step `step` (counted from 0): `weight`, 0 from `until_step` on."""
        if self.until_step and step >= self.until_step:
            return 0.0
        return self.weight
