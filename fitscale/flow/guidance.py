"""Classifier-free guidance on packed batches.

v = v_uncond + s (v_cond - v_uncond). The conditional and unconditional passes run as one
forward: the packed sequence is repeated, the second copy labelled with the null class, so a
batch of images of different sizes costs one model call per velocity evaluation.

The release guides only the first 3 of the 4 latent channels (a habit inherited from DiT, where
the other channels held the learned variance); `guidance_channels=3` reproduces it, and the
remaining channels keep the conditional velocity. A token's p*p*C values are ordered (channel,
row-in-patch, col-in-patch), so channel c owns values [c p^2, (c + 1) p^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def guide(
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    scale: float,
    guidance_channels: int | None = None,
    patch_size: int = 2,
) -> torch.Tensor:
    """Guided velocity (T, p*p*C); `guidance_channels=k` guides channels [0, k) only."""
    guided = v_uncond + scale * (v_cond - v_uncond)
    if guidance_channels is None:
        return guided
    split = guidance_channels * patch_size * patch_size
    if not 0 < split <= v_cond.shape[-1]:
        raise ValueError(
            f"guidance_channels={guidance_channels} does not fit tokens of {v_cond.shape[-1]} values "
            f"(patch size {patch_size})"
        )
    return torch.cat([guided[..., :split], v_cond[..., split:]], dim=-1)


@dataclass
class PackedLayout:
    """Where the images of a packed batch are: everything the model needs besides x and t."""

    labels: torch.Tensor  # (S,) int64
    pos: torch.Tensor  # (T, 2)
    cu_seqlens: torch.Tensor  # (S+1,) int32
    sizes: torch.Tensor  # (S, 2)
    max_seqlen: int

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.pos.shape[0])

    def doubled(self, null_class: int) -> PackedLayout:
        """The layout repeated, the copy's labels replaced by the null class."""
        offset = self.cu_seqlens[-1]
        return PackedLayout(
            labels=torch.cat([self.labels, torch.full_like(self.labels, null_class)]),
            pos=torch.cat([self.pos, self.pos]),
            cu_seqlens=torch.cat([self.cu_seqlens, self.cu_seqlens[1:] + offset]),
            sizes=torch.cat([self.sizes, self.sizes]),
            max_seqlen=self.max_seqlen,
        )


class PackedVelocity:
    """The model as a velocity function of (x (T, p*p*C), t scalar) for one packed batch.

    With `cfg_scale` != 1 the conditional and unconditional passes share one forward over the
    doubled sequence. The model runs in eval mode (no label dropout) under `autocast_dtype` when
    given; the velocity comes back in x's dtype.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layout: PackedLayout,
        cfg_scale: float = 1.0,
        guidance_channels: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.model = model
        self.cfg_scale = float(cfg_scale)
        self.guidance_channels = guidance_channels
        self.autocast_dtype = autocast_dtype
        config = model.config
        self.patch_size = config.patch_size
        self.guided = self.cfg_scale != 1.0
        self.layout = layout.doubled(config.num_classes) if self.guided else layout
        self.num_images = layout.num_images

    def _forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        layout = self.layout
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

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.guided:
            return self._forward(x, t.expand(self.num_images))
        tokens = x.shape[0]
        v = self._forward(torch.cat([x, x]), t.expand(2 * self.num_images))  # (2T, p*p*C)
        return guide(v[:tokens], v[tokens:], self.cfg_scale, self.guidance_channels, self.patch_size)


__all__ = ["PackedLayout", "PackedVelocity", "guide"]
