"""The rectified-flow loss of a packed batch, normalised by the global image count of the step.

Two choices make a step's loss and update independent of how its images are spread over
ranks and micro-batches:
- the noise and timestep of an image are drawn from a generator seeded by (run seed, step,
  sample id), not from a rank's RNG stream, so an image gets the same draw wherever it lands;
- each rank returns sum_i w_i L_i / N_global (L_i the mean squared error over image i's own
  tokens), and the gradient reduction across ranks sums, so the step sees the mean over all
  N_global images of the step whatever the split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fitscale.config.train import FlowConfig
from fitscale.data.batch import PackedBatch
from fitscale.flow.path import interpolate, velocity_target
from fitscale.flow.timesteps import sample_timesteps
from fitscale.models.attention import segment_ids_from_cu_seqlens
from fitscale.models.inputs import check_cu_seqlens
from fitscale.seeds import image_seed


def per_image_draws(
    batch: PackedBatch,
    seed: int,
    step: int,
    draw_time: Callable[[torch.Generator], float],
    padding_time: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Times (S,) and noise (T, C) for a CPU batch, each image's drawn from its own generator seeded
    by (seed, step, sample id): first its time, `draw_time(generator)`, then its tokens' noise.

    Segments past `num_images` (the padding tail) get `padding_time` and zero noise; losses ignore them.
    """
    lengths = batch.lengths.tolist()
    sample_ids = batch.sample_ids.tolist()
    channels = batch.tokens.shape[1]
    timesteps = torch.full((batch.num_segments,), padding_time, dtype=torch.float32)
    noise = torch.zeros(batch.num_tokens, channels, dtype=torch.float32)
    generator = torch.Generator()
    start = 0
    for index, length in enumerate(lengths[: batch.num_images]):
        generator.manual_seed(image_seed(seed, step, sample_ids[index]))
        timesteps[index] = draw_time(generator)
        noise[start : start + length] = torch.randn(length, channels, generator=generator)
        start += length
    return timesteps, noise


def per_image_noise(
    batch: PackedBatch, seed: int, step: int, flow: FlowConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps (S,) in [0, 1] and noise (T, C) for a CPU batch, each image's drawn from its own seed
    (`per_image_draws`); the padding tail gets t = 1 and zero noise."""

    def draw_time(generator: torch.Generator) -> float:
        return float(
            sample_timesteps(1, flow.timesteps, flow.logit_mean, flow.logit_std, flow.time_shift, generator)[
                0
            ]
        )

    return per_image_draws(batch, seed, step, draw_time, padding_time=1.0)


LABEL_STREAM = 0x1ABE1  # separates the label-dropout draw from the image's noise stream


def per_image_label_dropout(
    batch: PackedBatch, seed: int, step: int, prob: float, null_class: int
) -> torch.Tensor:
    """Labels (S,) with each real image's label replaced by the null class with probability `prob`.

    The draw of an image comes from its own seed (run seed, step, sample id), like its noise, so
    which labels are dropped does not depend on how the step's images are split over ranks or
    micro-batches (the model's own dropout would draw from each rank's RNG stream instead).
    """
    labels = batch.labels.clone()
    if prob <= 0:
        return labels
    generator = torch.Generator()
    for index, sample_id in enumerate(batch.sample_ids[: batch.num_images].tolist()):
        generator.manual_seed(image_seed(seed ^ LABEL_STREAM, step, sample_id))
        if float(torch.rand(1, generator=generator)) < prob:
            labels[index] = null_class
    return labels


@dataclass
class FlowLossOutput:
    """What `flow_loss` returns for one micro-batch.

    `loss` is the scalar to backpropagate: the weighted per-image losses of this micro-batch summed and
    divided by the step's global image count, so that summing over micro-batches and ranks gives the
    mean over the step's images. `per_image` and `timesteps` (num_images,) are detached, for logging
    the loss per timestep bucket.
    """

    loss: torch.Tensor  # scalar: sum_i w_i L_i / N_global over this micro-batch's images (backward this)
    per_image: torch.Tensor  # (num_images,) detached per-image mean squared error (unweighted)
    timesteps: torch.Tensor  # (num_images,) detached timesteps of the real images
    hidden: torch.Tensor | None = None  # (T, D') the model's hidden_after output (with grad), or None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # ddpm: detached (num_images,) mse, vb


def check_loss_inputs(batch: PackedBatch, timesteps: torch.Tensor, noise: torch.Tensor) -> None:
    """Shapes and counts the loss relies on (tensor metadata and host ints only: no device sync).

    The boundaries first, as the model checks them (fitscale.models.inputs): the loss spreads the
    timesteps over them before the model runs, where bad ones fail in ATen without naming a field.
    """
    check_cu_seqlens(batch.cu_seqlens, int(batch.tokens.shape[0]))
    segments = batch.num_segments
    if not 0 <= batch.num_images <= segments:
        raise ValueError(f"flow loss: num_images={batch.num_images} is not in [0, {segments}] (the segments)")
    if tuple(timesteps.shape) != (segments,):
        raise ValueError(
            f"flow loss: timesteps must have shape ({segments},), one per segment, got {tuple(timesteps.shape)}"
        )
    if noise.shape != batch.tokens.shape:
        raise ValueError(
            f"flow loss: noise has shape {tuple(noise.shape)}, the tokens {tuple(batch.tokens.shape)}"
        )
    if timesteps.device.type == "cpu":  # values of device tensors would need a sync: their sampler is ours
        bad = torch.nonzero(~((timesteps >= 0) & (timesteps <= 1))).flatten()  # NaN fails too
        if bad.numel():
            i = int(bad[0])
            raise ValueError(
                f"flow loss: timesteps[{i}]={float(timesteps[i])} is outside [0, 1] (1 = clean data)"
            )


def flow_loss(
    model: torch.nn.Module,
    batch: PackedBatch,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
    global_num_images: int,
    flow: FlowConfig,
    hidden_after: int | None = None,
) -> FlowLossOutput:
    """Forward the model on x_t of a packed batch (already on the model's device) and score it.

    With `hidden_after=k` the model also returns its (projected) hidden states after block k, kept
    in the output's `hidden` (T, D') for an alignment loss (fitscale.flow.repa).

    timesteps (S,) and noise (T, C) as per_image_noise makes them; the model checks the batch
    itself (fitscale.models.inputs), this checks what only the loss reads. Errors: ValueError.
    """
    check_loss_inputs(batch, timesteps, noise)
    tokens = batch.tokens.float()  # (T, C)
    x_t = interpolate(tokens, noise, per_token(timesteps, batch)[:, None])  # (T, C)
    target = velocity_target(tokens, noise)  # (T, C)
    velocity = model_on_batch(
        model, x_t, timesteps, batch, **({} if hidden_after is None else {"hidden_after": hidden_after})
    )  # (T, C), or ((T, C), (T, D')) with hidden_after
    hidden = None
    if hidden_after is not None:
        velocity, hidden = velocity
    token_error = (velocity.float() - target).square().mean(dim=1)  # (T,)
    per_image, _ = per_image_mean(token_error, batch)  # (N,)
    loss = weighted_image_sum(per_image, batch, flow) / global_num_images
    return FlowLossOutput(
        loss=loss,
        per_image=per_image.detach(),
        timesteps=timesteps[: batch.num_images].detach(),
        hidden=hidden,
    )


def per_token(values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """A per-segment value (S,) (an image's time or timestep index) repeated over the segment's tokens (T,)."""
    return torch.repeat_interleave(values, batch.lengths.to(values.device), output_size=batch.num_tokens)


def model_on_batch(
    model: torch.nn.Module, x_t: torch.Tensor, timesteps: torch.Tensor, batch: PackedBatch, **extra
):
    """The network on the noised tokens x_t (T, C) of a packed batch at per-segment `timesteps` (S,),
    with the batch's labels, positions and image boundaries: what both training objectives call."""
    return model(
        x_t,
        timesteps,
        batch.labels,
        batch.pos,
        batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
        sizes=batch.sizes,
        **extra,
    )


def weighted_image_sum(per_image: torch.Tensor, batch: PackedBatch, flow: FlowConfig) -> torch.Tensor:
    """The sum of per-image losses (N,) under `flow.loss_weighting`: each image alike (`images`), or
    in proportion to its token count over `flow.reference_tokens` (`tokens`)."""
    if flow.loss_weighting == "tokens":
        weights = batch.lengths[: batch.num_images].to(per_image) / flow.reference_tokens
    else:
        weights = torch.ones_like(per_image)
    return (weights * per_image).sum()


def per_image_mean(values: torch.Tensor, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of per-token `values` (T,) over each real image's own tokens, (N,), and the token
    counts (N,) in values' dtype. The padding segments come last and are left out."""
    segment_lengths = batch.lengths.to(values.device)  # (S,)
    segment = segment_ids_from_cu_seqlens(batch.cu_seqlens.to(values.device), batch.num_tokens)  # (T,)
    segment_sum = values.new_zeros(batch.num_segments).index_add(0, segment, values)  # (S,)
    lengths = segment_lengths[: batch.num_images].to(values.dtype)  # (N,)
    return segment_sum[: batch.num_images] / lengths, lengths
