"""FiT (v1 and v2): a diffusion transformer over packed sequences of images of any size.

Images of different token counts run as one flat sequence with no padding; attention stays
within each image (see attention.py), and every per-image quantity (timestep, label, AdaLN
modulation, RoPE scaling) is one row per image gathered to its tokens. This computes exactly
the released FiTv2 function, image by image, without the released padding to 256/1024 tokens.
The model knows nothing of distribution: parallelism is applied from outside (fitscale.parallel).
"""

from __future__ import annotations

import torch
from torch import nn

from fitscale.config.model import ModelConfig, build_config
from fitscale.models.attention import build_document_mask, segment_ids_from_cu_seqlens
from fitscale.models.inputs import check_packed_batch
from fitscale.models.layers import (
    FinalLayer,
    FiTBlock,
    LabelEmbedder,
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
    last_linear,
    shift_time,
)
from fitscale.models.rope import rope_cos_sin


class FiT(nn.Module):
    """FiT, the flexible vision transformer for diffusion, over packed sequences of images of any size.

    Every switch of the release's FiT class is a ModelConfig field (norms, AdaLN kind, MLP kind,
    biases, RoPE): the defaults are FiTv2, the `fit-xl` / `fit-b` presets FiT v1.

    Computes the released FiTv2 function (release: `fit/model/fit_model.py`, `fit/model/modules.py`)
    image by image, without the release's padding of every image to 256 or 1024 tokens: patch
    embedding, timestep + label conditioning with the global AdaLN modulation,
    `depth` blocks of AdaLN-LoRA-modulated, QK-normed, 2-D-RoPE attention restricted to each image
    and SwiGLU, then the modulated final layer. Parameter names are the release's, so its
    checkpoints load by name (fitscale.models.official).

    Build it with `build_model(name, **overrides)` (on the meta device for large models, then
    `to_empty` and `init_weights`). Inputs follow the packed-batch contract of
    fitscale/models/inputs.py (fitscale.data.batch.PackedBatch carries them); see `forward`.
    The module holds no distributed code: fitscale.parallel wraps it from outside.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.token_dim, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(
            config.num_classes, D, config.class_dropout_prob, config.has_null_class
        )
        self.global_adaLN_modulation = (
            nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D, bias=config.adaln_bias))
            if config.has_global_adaln
            else None
        )
        self.blocks = nn.ModuleList(FiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        self.hidden_head: nn.Module | None = None  # see attach_hidden_head: none by default

    def forward(
        self,
        x: torch.Tensor,  # (T, p*p*C) packed noisy tokens
        t: torch.Tensor,  # (S,) timesteps in [0, 1], 1 = clean data
        y: torch.Tensor,  # (S,) class labels; num_classes = null class
        pos: torch.Tensor,  # (T, 2) (row, col) in each image's patch grid
        cu_seqlens: torch.Tensor,  # (S+1,) int32 image boundaries, 0 to T
        max_seqlen: int | None = None,  # longest image; computed here (a host sync) when absent
        sizes: torch.Tensor | None = None,  # (S, 2) grid rows/cols; derived from pos when absent
        hidden_after: int | None = None,  # also return the hidden states after this block (1-based)
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The velocity (T, p*p*C) of every token of a packed batch of noisy images at times `t`.

        t = 0 is noise and t = 1 clean data (FiTv2's convention), so the output approximates
        data - noise of each token (rectified flow, fitscale.flow). Padding segments of a static
        token budget are images of the null class here; the loss ignores them. Raises ValueError,
        naming the field and values, for a batch that breaks the contract of fitscale/models/inputs.py
        (values checked for CPU tensors only), and RuntimeError when the configured attention backend
        cannot run on x's device and dtype.

        With `hidden_after=k` (1 <= k <= depth) it returns (velocity, hidden): hidden (T, D') is the
        output of block k passed through `hidden_head` when one is attached (an auxiliary head that
        trains with the model, such as REPA's projector, fitscale.flow.repa), else (T, D) as is. The
        head runs inside this forward so that FSDP2 and DeepSpeed gather and reduce its parameters
        with the root's; the default call (`hidden_after=None`) is unchanged and never runs it.
        """
        config = self.config
        check_packed_batch(
            x, t, y, pos, cu_seqlens, max_seqlen, sizes,
            token_dim=config.token_dim,
            num_classes=config.num_classes,
            padded=config.attn_backend == "padded",
        )  # fmt: skip
        total = x.shape[0]
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        h = self.x_embedder(x)  # (T, D)
        if sizes is None:
            segment_ids = segment_ids_from_cu_seqlens(cu_seqlens, total)
            sizes = grid_sizes(pos, segment_ids, t.shape[0])  # (S, 2)
        mask = build_document_mask(
            cu_seqlens, max_seqlen, total, self.config.attn_backend, h.device, h.dtype, sizes
        )
        cos = sin = None
        if config.rel_pos_embed == "rope":
            cos, sin = rope_cos_sin(self.config, pos, mask.segment_ids, sizes)  # (T, d) each
        c = self.t_embedder(shift_time(t, config.time_shift, config.time_clamp)) + self.y_embedder(
            y
        )  # (S, D)
        global_modulation = None
        if self.global_adaLN_modulation is not None:
            global_modulation = self.global_adaLN_modulation(c)  # (S, 6D)
        if hidden_after is not None and not 1 <= hidden_after <= len(self.blocks):
            raise ValueError(f"hidden_after={hidden_after}: the model has blocks 1..{len(self.blocks)}")
        hidden = None
        for index, block in enumerate(self.blocks):
            h = block(h, c, global_modulation, mask, cos, sin)  # (T, D)
            if index + 1 == hidden_after:
                hidden = h if self.hidden_head is None else self.hidden_head(h)
        out = self.final_layer(h, c, mask.segment_ids)  # (T, p*p*C)
        return out if hidden_after is None else (out, hidden)

    def attach_hidden_head(self, head: nn.Module) -> None:
        """Register `head` (T, D) -> (T, D') as `hidden_head`, applied to the hidden states that
        `forward(..., hidden_after=k)` returns; its parameters are named `hidden_head.*`."""
        self.hidden_head = head

    @torch.no_grad()
    def init_weights(self) -> None:
        """The released initialisation (initialize_weights): xavier linears with zero biases, N(0, 0.02)
        embeddings, the last linear of every modulation (SwiGLU modulation: its fc2) and the output
        linear zeroed; norm weights at 1 (set by their constructors in the release)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)) and module.weight is not None:
                nn.init.ones_(module.weight)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_init = [last_linear(self.final_layer.adaLN_modulation), self.final_layer.linear]
        zero_init += [last_linear(block.adaLN_modulation) for block in self.blocks]
        if self.global_adaLN_modulation is not None:
            zero_init.append(self.global_adaLN_modulation[-1])
        for linear in zero_init:
            nn.init.zeros_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)


def grid_sizes(pos: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
    """(S, 2) rows/cols of each image as 1 + its largest row/col position (no host sync)."""
    sizes = torch.zeros(num_segments, 2, dtype=pos.dtype, device=pos.device)
    index = segment_ids[:, None].expand(-1, 2)
    return sizes.scatter_reduce(0, index, pos, reduce="amax", include_self=True) + 1


def build_model(name: str = "fitv2-xl", **overrides) -> FiT:
    """A FiT preset (FiTv2 or FiT v1) with overrides. Under `torch.device("meta")` nothing is allocated;
    then `model.to_empty(device=...)` and `model.init_weights()`. Otherwise weights are initialised."""
    config = build_config(name, **overrides)
    target = torch.get_default_device()
    with torch.device("meta"):
        model = FiT(config)
    if target.type != "meta":
        model.to_empty(device=target)
        model.init_weights()
    return model
