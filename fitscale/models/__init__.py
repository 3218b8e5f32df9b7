"""FiTv2 models: presets, the packed network, RoPE extrapolation, released-checkpoint I/O."""

from fitscale.models.config import PRESETS, ModelConfig, build_config, preset_names
from fitscale.models.fit import FiT, build_model
from fitscale.models.official import (
    export_official_state_dict,
    load_official_checkpoint,
    load_official_state_dict,
    read_checkpoint_file,
)

__all__ = [
    "PRESETS",
    "FiT",
    "ModelConfig",
    "build_config",
    "build_model",
    "export_official_state_dict",
    "load_official_checkpoint",
    "load_official_state_dict",
    "preset_names",
    "read_checkpoint_file",
]
