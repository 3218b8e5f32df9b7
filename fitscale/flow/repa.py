"""REPA: align the model's hidden states with a frozen vision encoder's patch features.

Representation alignment (Yu et al. 2024, "Representation Alignment for Generation",
sihyun-yu/REPA): the hidden states after block k pass through a per-token MLP (the projector) and
are pulled towards the patch features of a frozen self-supervised encoder computed on the clean
image, by the negative cosine similarity per token. Here each image of a packed batch is encoded
on its own grid (fitscale.flow.repa_encoder), so token i of an image meets the encoder's patch i.

The loss is reduced exactly like the flow loss (fitscale.flow.loss): the mean over each image's
own tokens, summed over this micro-batch's images and divided by the step's global image count.
Summed over micro-batches and ranks it is the mean over the step's images, whatever the packing.
"""

from __future__ import annotations

import torch
from torch import nn

from fitscale.data.batch import PackedBatch
from fitscale.flow.loss import per_image_mean


class Projector(nn.Module):
    """Per-token MLP (T, D) -> (T, E): `depth` linears with SiLU between them (REPA: 3 layers, 2048
    wide, to the encoder's width). It trains with the model as its `hidden_head` (FiT.attach_hidden_head)."""

    def __init__(self, in_dim: int, width: int, out_dim: int, depth: int = 3):
        super().__init__()
        dims = [in_dim] + [width] * (depth - 1) + [out_dim]
        layers: list[nn.Module] = []
        for index in range(depth):
            if index:
                layers.append(nn.SiLU())
            layers.append(nn.Linear(dims[index], dims[index + 1]))
        self.mlp = nn.Sequential(*layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(T, D) hidden states -> (T, E) predictions of the encoder's features."""
        return self.mlp(hidden)


def attach_projector(model: nn.Module, repa, encoder_dim: int) -> None:
    """Give `model` (a FiT) the projector of `repa` (a RepaConfig) as its hidden head, when REPA is
    on; its parameters are then `hidden_head.*`: trained, sharded and checkpointed with the model's,
    left out of exported weights (fitscale.checkpoint.export) and of sampling."""
    if not repa.enabled:
        return
    hidden = model.config.hidden_size
    model.attach_hidden_head(Projector(hidden, repa.projector_width, encoder_dim, repa.projector_depth))


def repa_loss(
    predicted: torch.Tensor, target: torch.Tensor, batch: PackedBatch, global_num_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per_image): loss = sum_i L_i / N_global over this micro-batch's real images, with
    L_i = mean over image i's tokens of -cos(predicted, target); per_image (N,) detached.

    predicted (T, E) the projector's output for every token (padding included), target (T, E) the
    encoder's features in the same token order (padding rows are ignored). Computed in fp32.
    Raises ValueError when the shapes differ.
    """
    if predicted.shape != target.shape:
        raise ValueError(
            f"repa loss: predicted features {tuple(predicted.shape)} and encoder features "
            f"{tuple(target.shape)} differ; the encoder's grid must equal each image's token grid"
        )
    cosine = nn.functional.cosine_similarity(predicted.float(), target.float(), dim=-1)  # (T,)
    per_image, _ = per_image_mean(-cosine, batch)  # (N,)
    return per_image.sum() / global_num_images, per_image.detach()
