"""Classifier-free guidance on packed batches.

v = v_uncond + s (v_cond - v_uncond). The conditional and unconditional passes run as one
forward: the packed sequence is repeated, the second copy labelled with the null class, so a
batch of images of different sizes costs one model call per velocity evaluation.

The release guides only the first 3 of the 4 latent channels (a habit inherited from DiT, where
the other channels held the learned variance); `guidance_channels=3` reproduces it, and the
remaining channels keep the conditional velocity. A token's p*p*C values are ordered (channel,
row-in-patch, col-in-patch), so channel c owns values [c p^2, (c + 1) p^2). Like the release's
slice model_out[:, :3 p^2], the first min(k p^2, width) values are guided: every value of a model
with fewer than k channels, and for a ddpm learn_sigma model (whose whole output, eps then the
variance values, goes through guide()) the slice reaches into the variance values as it does there.

The release's `scale_pow` schedule (its `forward_with_cfg`, after MDT) lowers the scale towards
the data end: s(t) = 1 + (s - 1) (1 - cos(pi (1 - t)^scale_pow)) / 2, full at t = 0 (noise) and
1 (no guidance) at t = 1; scale_pow = 0 keeps the constant scale.
"""

from __future__ import annotations

import math

import torch

from fitscale.data.batch import PackedLayout
from fitscale.errors import UserError


def guidance_scale(cfg_scale: float, t: torch.Tensor, scale_pow: float = 0.0) -> torch.Tensor:
    """The guidance scale at times t (any shape, 0 = noise), release `forward_with_cfg`'s schedule."""
    if scale_pow == 0.0:
        return torch.full_like(t, cfg_scale)
    step = (1 - torch.cos((1 - t.clamp(max=1.0)) ** scale_pow * math.pi)) / 2
    return (cfg_scale - 1) * step + 1


def guide(
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    scale: float | torch.Tensor,
    guidance_channels: int | None = None,
    patch_size: int = 2,
) -> torch.Tensor:
    """Guided output (T, W) of the model outputs (T, W) (W = p*p*C, or 2 p*p*C with learn_sigma);
    `scale` a float or per token (T, 1). `guidance_channels=k` guides the first min(k p^2, W) values
    only (the release's forward_with_cfg slice), the rest keep v_cond; UserError for k <= 0."""
    guided = v_uncond + scale * (v_cond - v_uncond)
    if guidance_channels is None:
        return guided
    if guidance_channels <= 0:
        raise UserError(
            f"guidance_channels={guidance_channels} must be >= 1 (the number of leading latent channels "
            "to guide) or None for all"
        )
    split = min(guidance_channels * patch_size * patch_size, v_cond.shape[-1])
    return torch.cat([guided[..., :split], v_cond[..., split:]], dim=-1)


def no_null_class_message(cfg_scale: float) -> str:
    """The one-line refusal of guidance for a model without the null-class row (class_dropout_prob=0)."""
    return (
        f"classifier-free guidance scale {cfg_scale:g} needs the null class, but the model has "
        "model.class_dropout_prob=0 and so no null-class row: use --cfg 1 (train.sample_cfg_scale=1 "
        "for previews) or a model trained with model.class_dropout_prob > 0"
    )


class PackedVelocity:
    """The model as a velocity function of one packed batch: `v(x (T, p*p*C), t scalar)` for all
    images at one time, or `v.images(images, xs, ts)` for some of them, each at its own time
    (fitscale.flow.per_image).

    With `cfg_scale` != 1 the conditional and unconditional passes share one forward over the
    doubled sequence; `scale_pow` > 0 applies the release's schedule of the scale over time. The
    model runs in eval mode (no label dropout) under `autocast_dtype` when given; the velocity
    comes back in x's dtype.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layout: PackedLayout,
        cfg_scale: float = 1.0,
        guidance_channels: int | None = None,
        autocast_dtype: torch.dtype | None = None,
        scale_pow: float = 0.0,
    ):
        self.model = model
        self.layout = layout
        self.cfg_scale = float(cfg_scale)
        self.scale_pow = float(scale_pow)
        self.guidance_channels = guidance_channels
        self.autocast_dtype = autocast_dtype
        config = model.config
        self.patch_size = config.patch_size
        self.null_class = config.num_classes
        self.guided = self.cfg_scale != 1.0
        if self.guided and not getattr(config, "has_null_class", True):
            raise UserError(no_null_class_message(self.cfg_scale))
        self._layouts: dict[tuple[int, ...], PackedLayout] = {}

    def _forward(self, layout: PackedLayout, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        enabled = self.autocast_dtype is not None
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=enabled):
            out = self.model(
                x,
                t,
                layout.labels,
                layout.pos,
                layout.cu_seqlens,
                max_seqlen=layout.max_seqlen,
                sizes=layout.sizes,
            )
        return out.to(x.dtype)

    def _velocity(self, layout: PackedLayout, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x (T, p*p*C) of `layout`'s images, t (S,) -> guided velocity (T, p*p*C)."""
        if not self.guided:
            return self._forward(layout, x, t)
        tokens = x.shape[0]
        v = self._forward(layout.doubled(self.null_class), torch.cat([x, x]), torch.cat([t, t]))  # (2T, ..)
        scale: float | torch.Tensor = self.cfg_scale
        if self.scale_pow != 0.0:
            per_image = guidance_scale(self.cfg_scale, t.float(), self.scale_pow)
            scale = per_image.repeat_interleave(layout.lengths, output_size=tokens)[:, None].to(x.dtype)
        return guide(v[:tokens], v[tokens:], scale, self.guidance_channels, self.patch_size)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self._velocity(self.layout, x, t.expand(self.layout.num_segments))

    @torch.no_grad()
    def images(self, images: list[int], xs: list[torch.Tensor], ts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Velocities of some images (their numbers in the layout), each at its own time."""
        key = tuple(images)
        if key not in self._layouts:
            self._layouts[key] = self.layout.select(images)
        layout = self._layouts[key]
        t = torch.stack([t.reshape(()) for t in ts])
        v = self._velocity(layout, torch.cat(xs), t)
        return list(v.split([x.shape[0] for x in xs]))


__all__ = ["PackedVelocity", "guidance_scale", "guide"]
