"""fitscale models and reference models holding the same random released-format weights.

The bridge between the two is the released state dict: weights are drawn in the release's names,
loaded into the reference with `load_state_dict` and into fitscale with
`fitscale.models.official.load_official_state_dict`, so the loader is under test too.
"""

from __future__ import annotations

import torch

from fitscale.data.batch import PackedBatch, pack_images

from .official_fitv2 import (
    OfficialFiTv2,
    ReferenceConfig,
    pad_images,
    random_official_state_dict,
    unpad,
)
from .release_rope import RopeSpec

# fitscale's rope_method -> the release's custom_freqs (fit/model/rope.py), stated here on its own.
RELEASE_NAMES = {
    "none": "normal",
    "linear": "linear",
    "ntk": "ntk-aware",
    "ntk_by_parts": "ntk-by-parts",
    "yarn": "yarn",
    "ntk_pro1": "ntk-aware-pro1",
    "ntk_pro2": "ntk-aware-pro2",
}


def release_rope_of(config) -> RopeSpec:
    """The release's RoPE arguments for a fitscale ModelConfig (no target grid: the L0 x L0 grid)."""
    rows, cols = config.rope_target_grid or (config.rope_base_grid, config.rope_base_grid)
    return RopeSpec(
        custom_freqs=RELEASE_NAMES[config.rope_method],
        decouple=config.rope_decoupled,
        online_rope=config.rope_per_image,
        max_pe_len_h=rows,
        max_pe_len_w=cols,
        ori_max_pe_len=config.rope_base_grid,
        theta=config.rope_theta,
        attn_scale=config.rope_attn_scale,
    )


def reference_config_of(config) -> ReferenceConfig:
    """The reference's (the release's) arguments for a fitscale ModelConfig with adaln_global unset."""
    rope = release_rope_of(config)
    # ModelConfig stores the norms as the release's create_norm names
    q_norm, k_norm = config.q_norm, config.k_norm
    return ReferenceConfig(
        depth=config.depth,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        lora_rank=config.adaln_lora_rank,
        num_classes=config.num_classes,
        in_channels=config.in_channels,
        patch_size=config.patch_size,
        class_dropout_prob=config.class_dropout_prob,
        rope=rope,
        mlp_ratio=config.mlp_ratio,
        learn_sigma=config.learn_sigma,
        use_swiglu=config.mlp != "gelu",
        use_swiglu_large=config.mlp == "swiglu_large",
        rel_pos_embed=config.rel_pos_embed,
        add_rel_pe_to_v=config.rope_on_values,
        norm_type=config.norm,
        q_norm=q_norm,
        k_norm=k_norm,
        qk_norm_weight=False,  # carried by the w_ names above
        qkv_bias=config.qkv_bias,
        ffn_bias=config.mlp_bias,
        adaln_bias=config.adaln_bias,
        adaln_type=config.adaln,
        time_shifting=config.time_shift,
    )


def build_fitscale(name: str, initialise: bool = True, **overrides) -> torch.nn.Module:
    """A fitscale model built on meta, materialised on the CPU in fp32 and (optionally) initialised.

    `initialise=False` leaves the memory as allocated: for a model whose every weight is loaded next.
    """
    from fitscale.models import build_model

    with torch.device("meta"):
        model = build_model(name, **overrides)
    model.to_empty(device="cpu")
    if initialise:
        model.init_weights()
    return model


def build_pair(name: str, seed: int = 0, **overrides) -> tuple[torch.nn.Module, OfficialFiTv2, dict]:
    """(fitscale model, reference model, state dict) with identical non-zero random weights, eval mode."""
    from fitscale.models.official import load_official_state_dict

    model = build_fitscale(name, initialise=False, **overrides)  # every weight is loaded below
    state = random_official_state_dict(reference_config_of(model.config), seed=seed)
    load_official_state_dict(model, state)
    with torch.device("meta"):
        reference = OfficialFiTv2(reference_config_of(model.config))
    reference.load_state_dict(state, strict=True, assign=True)  # shares the tensors of `state`
    return model.eval(), reference.eval(), state


def random_images(grids: list[tuple[int, int]], token_dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(rows * cols, token_dim, generator=generator) for rows, cols in grids]


def packed_forward(model, images, grids, t, y, token_budget: int | None = None) -> list[torch.Tensor]:
    """Run fitscale's packed forward and split the output back into images."""
    batch = pack(images, grids, y, token_budget, null_class=model.config.num_classes)
    padding = batch.num_segments - len(images)  # padding segments, each with its own t and label
    t = torch.cat([t, t.new_ones(padding)])
    out = model(batch.tokens, t, batch.labels, batch.pos, batch.cu_seqlens, batch.max_seqlen, batch.sizes)
    bounds = batch.cu_seqlens.tolist()
    return [out[bounds[i] : bounds[i + 1]] for i in range(len(images))]


def pack(images, grids, y, token_budget=None, null_class: int = 1000) -> PackedBatch:
    return pack_images(
        images, grids, [int(v) for v in y], list(range(len(images))), token_budget, null_class=null_class
    )


def reference_forward(reference: OfficialFiTv2, images, grids, t, y, limit: int) -> list[torch.Tensor]:
    """Run the release's padded forward and drop the padding."""
    x, grid, mask, size = pad_images(images, grids, limit)
    return unpad(reference(x, t, y, grid, mask, size), grids)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the Frobenius norm over all elements); an all-zero
    `expected` divides by 1e-30, so only an exact match passes a bound."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp(min=1e-30))
