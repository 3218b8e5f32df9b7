"""Rectified flow: the interpolation path, timestep samplers and the packed-batch loss; the ODE
samplers (`samplers`, solved per image by `per_image`), the SDE (`sde`) and guidance (`guidance`)
are imported from their submodules, as is the release's DDPM objective of FiT v1 models (`ddpm`:
the Gaussian diffusion and its ancestral sampler; `ddpm_loss`: its packed-batch loss)."""

from fitscale.lazy import lazy_exports

# Imported on first use, so that importing the package does not import torch.
_EXPORTS = {
    "FlowLossOutput": "loss",
    "flow_loss": "loss",
    "interpolate": "path",
    "per_image_label_dropout": "loss",
    "per_image_noise": "loss",
    "sample_timesteps": "timesteps",
    "shift_time": "path",
    "velocity_target": "path",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
