"""The Trainer's side of REPA (`train.repa`): the frozen encoder and the dataset's pixels for a run.

Built once per rank: the pixel store of `data.path` (a dataset without pixels is refused with the
command that writes them) and the frozen encoder (fitscale.flow.repa_encoder), on the run's device.
Per micro-batch, `loss` encodes the batch's images and scores the model's projected hidden states
(fitscale.flow.repa); the trainer adds it, weighted, to the flow loss.
"""

from __future__ import annotations

import torch

from fitscale.config.errors import ConfigError
from fitscale.data.batch import PackedBatch
from fitscale.data.pixels import PixelStore
from fitscale.flow.repa import repa_loss
from fitscale.flow.repa_encoder import FrozenEncoder


class RepaTerm:
    """The alignment term of a run's loss: `weight(step)`, `loss(...)`, and the encoder's seconds."""

    def __init__(self, config, device: torch.device):

        self.config = config.train.repa
        try:
            self.pixels = PixelStore(config.data.path)
        except (FileNotFoundError, ValueError) as error:
            raise ConfigError(str(error)) from None
        self.encoder = FrozenEncoder(self.config, device, self.pixels.pixels_per_token)

    @property
    def block(self) -> int:
        """The block whose hidden states are aligned (1-based)."""
        return self.config.block

    def weight(self, step: int) -> float:
        """The loss weight at step `step` (0 once `train.repa.until_step` is reached)."""
        return self.config.weight_at(step)

    def loss(self, host_batch: PackedBatch, batch: PackedBatch, hidden: torch.Tensor, global_images: int):
        """This micro-batch's share of the step's mean alignment loss (scalar, with grad).

        `host_batch` is the micro-batch on the CPU (sample ids, grids and flips pick the pixels),
        `batch` the same on the model's device, `hidden` (T, E) the projector's output."""

        target = self.encoder.features(host_batch, self.pixels)  # (T, E), no grad
        loss, _ = repa_loss(hidden, target, batch, global_images)
        return loss

    def take_seconds(self) -> float:
        """Encoder seconds on this rank since the last call."""
        return self.encoder.take_seconds()
