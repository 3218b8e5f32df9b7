"""Latent datasets on MosaicML Streaming, token-budget packing and the resumable loader."""

from fitscale.data.batch import PackedBatch, grid_positions, pack_images, padding_batch
from fitscale.data.loader import LatentLoader, StepBatch, build_loader, build_validation_loader

__all__ = [
    "LatentLoader",
    "PackedBatch",
    "StepBatch",
    "build_loader",
    "build_validation_loader",
    "grid_positions",
    "pack_images",
    "padding_batch",
]
