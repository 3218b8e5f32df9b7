"""Latent datasets on MosaicML Streaming, token-budget packing and the resumable loader."""

from fitscale.lazy import lazy_exports

# Imported on first use, so that importing the package does not import torch.
_EXPORTS = {
    "LatentLoader": "loader",
    "PackedBatch": "batch",
    "PackedLayout": "batch",
    "cu_seqlens_from_lengths": "batch",
    "StepBatch": "loader",
    "build_loader": "loader",
    "build_validation_loader": "loader",
    "grid_positions": "batch",
    "pack_images": "batch",
    "padding_batch": "batch",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
