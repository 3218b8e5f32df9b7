"""FiTv2 models: presets, the packed network, RoPE extrapolation, released-checkpoint I/O."""

from fitscale.lazy import lazy_exports

# Imported on first use, so that importing the package does not import torch.
_EXPORTS = {
    "PRESETS": "fitscale.config.model",
    "FiT": "fit",
    "ModelConfig": "fitscale.config.model",
    "build_config": "fitscale.config.model",
    "build_model": "fit",
    "export_official_state_dict": "official",
    "load_official_checkpoint": "official",
    "load_official_state_dict": "official",
    "preset_names": "fitscale.config.model",
    "read_checkpoint_file": "official",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
