"""FLOP and memory accounting from the model's own shapes.

Two conventions:
- `forward_flops`: what the hardware computes for real tokens, 2 FLOPs per multiply-add,
  attention's two matmuls included (QK^T and AV, L^2 * D multiply-adds each per block and
  image). A training step costs 3x the forward. MFU uses this, padding excluded.
- `paper_gflops`: the DiT/FiT "GFLOPs" of the papers: linear-layer multiply-adds of one image
  of 256 tokens (27.3 / 147 / 653 quoted for B / XL / 3B), used for the paper's training-compute
  axis (GFLOPs x batch x steps x 3).
"""

from __future__ import annotations

from collections.abc import Sequence

from fitscale.config.model import ModelConfig
from fitscale.models.layers import TIMESTEP_FEATURES


def linear_macs_per_token(config: ModelConfig) -> int:
    """Multiply-adds per token of the linear layers (qkv, proj, SwiGLU of every block; patch embed and
    final linear).
    """
    D, depth = config.hidden_size, config.depth
    per_block = 3 * D * D + D * D + 3 * D * config.mlp_hidden  # qkv, proj, SwiGLU
    return depth * per_block + 2 * config.token_dim * D  # + patch embedding and final linear


def linear_macs_per_image(config: ModelConfig) -> int:
    """Conditioning computed once per image: timestep MLP, AdaLN-LoRA, global and final modulation."""
    D, r = config.hidden_size, config.adaln_lora_rank
    timestep = TIMESTEP_FEATURES * D + D * D
    modulation = config.depth * (D * r + r * 6 * D) + D * 6 * D + D * 2 * D
    return timestep + modulation


def attention_macs(config: ModelConfig, seqlen: int) -> int:
    """Multiply-adds of attention's two matmuls (QK^T and AV) for one image of `seqlen` tokens, over all
    blocks.
    """
    return config.depth * 2 * seqlen * seqlen * config.hidden_size


def forward_flops(config: ModelConfig, seqlens: Sequence[int]) -> int:
    """FLOPs of one forward over a packed batch of images with `seqlens` tokens each."""
    total_tokens = sum(seqlens)
    macs = total_tokens * linear_macs_per_token(config) + len(seqlens) * linear_macs_per_image(config)
    macs += sum(attention_macs(config, n) for n in seqlens)
    return 2 * macs


def training_flops(config: ModelConfig, seqlens: Sequence[int]) -> int:
    """Forward + backward (2x forward) of a packed batch."""
    return 3 * forward_flops(config, seqlens)


def paper_gflops(config: ModelConfig, tokens: int = 256) -> float:
    """The papers' "GFLOPs": linear-layer multiply-adds of one image of `tokens` tokens, in 1e9."""
    return (tokens * linear_macs_per_token(config) + linear_macs_per_image(config)) / 1e9


def count_parameters(config: ModelConfig) -> int:
    """Parameter count of a FiT with `config`, from shapes alone (equals `sum(p.numel())` of the built
    model).
    """
    D, r, depth = config.hidden_size, config.adaln_lora_rank, config.depth
    linear = lambda fan_in, fan_out: fan_in * fan_out + fan_out
    block = linear(D, 3 * D) + linear(D, D) + 2 * linear(D, config.mlp_hidden) + linear(config.mlp_hidden, D)
    block += linear(D, r) + linear(r, 6 * D)
    return (
        linear(config.token_dim, D)
        + linear(TIMESTEP_FEATURES, D)
        + linear(D, D)
        + (config.num_classes + 1) * D
        + linear(D, 6 * D)
        + depth * block
        + linear(D, config.token_dim)
        + linear(D, 2 * D)
    )


def training_memory_bytes(num_params: int, trainable: int | None = None) -> dict[str, int]:
    """Bytes of fp32 master weights, fp32 gradients and AdamW's two fp32 moments (before sharding)."""
    trainable = num_params if trainable is None else trainable
    return {
        "weights_fp32": 4 * num_params,
        "weights_bf16": 2 * num_params,
        "grads_fp32": 4 * trainable,
        "adamw_state_fp32": 8 * trainable,
        "total_fp32_training": 4 * num_params + 12 * trainable,
    }
