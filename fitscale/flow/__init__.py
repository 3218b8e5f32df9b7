"""Rectified flow: the interpolation path, timestep samplers and the packed-batch loss."""

from fitscale.flow.loss import FlowLossOutput, flow_loss, per_image_label_dropout, per_image_noise
from fitscale.flow.path import interpolate, shift_time, velocity_target
from fitscale.flow.timesteps import sample_timesteps

__all__ = [
    "FlowLossOutput",
    "flow_loss",
    "interpolate",
    "per_image_label_dropout",
    "per_image_noise",
    "sample_timesteps",
    "shift_time",
    "velocity_target",
]
