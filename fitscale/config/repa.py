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

from fitscale.config.bounds import bound
from fitscale.config.errors import ConfigError
from fitscale.config.schema import check_choices


@dataclass
class RepaConfig:
    """Representation alignment: off unless `encoder` names a timm model."""

    encoder: str | None = None
    """timm model name of the frozen encoder, e.g. vit_base_patch14_dinov2 (DINOv2-B); None: REPA off."""
    encoder_weights: str | None = None
    """Local file of the encoder's state dict (.safetensors, or .pt/.pth/.bin read weights-only)."""
    encoder_args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of timm.create_model for the encoder (e.g. patch_size, embed_dim, depth)."""
    block: int = field(default=8, metadata=bound(1, meaning="blocks count from 1"))
    """Align the hidden states after this block (1-based, 1..model depth)."""
    projector_width: int = field(default=2048, metadata=bound(1))
    """Hidden width of the projector MLP."""
    projector_depth: int = field(default=3, metadata=bound(1))
    """Linear layers of the projector (SiLU between them); the last maps to the encoder's width."""
    weight: float = field(default=0.5, metadata=bound(0))
    """Weight of the alignment loss added to the flow loss."""
    until_step: int = field(default=0, metadata=bound(0, meaning="0 = never off"))
    """Turn the alignment off from this step on (its weight becomes 0); 0 keeps it on throughout."""

    @property
    def enabled(self) -> bool:
        """Whether REPA runs (an encoder is named)."""
        return bool(self.encoder)

    def __post_init__(self) -> None:
        check_choices(self, "train.repa.")  # the declared bounds (fitscale.config.bounds)
        if not self.enabled:
            return
        if not self.encoder_weights:
            raise ConfigError(
                f"train.repa.encoder_weights: encoder {self.encoder!r} needs a local weights file; "
                "set train.repa.encoder_weights=PATH (nothing is downloaded)"
            )

    def weight_at(self, step: int) -> float:
        """The loss weight at optimizer step `step` (counted from 0): `weight`, 0 from `until_step` on."""
        if self.until_step and step >= self.until_step:
            return 0.0
        return self.weight
