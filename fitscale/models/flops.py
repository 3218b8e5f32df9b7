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


def mlp_macs_per_token(config: ModelConfig) -> int:
    """Multiply-adds per token of one block's MLP: SwiGLU has two input linears, GELU one."""
    D, hidden = config.hidden_size, config.mlp_hidden
    return (1 if config.mlp == "gelu" else 2) * D * hidden + hidden * D


def linear_macs_per_token(config: ModelConfig) -> int:
    """Multiply-adds per token of the linear layers (qkv, proj, MLP of every block; patch embed and
    final linear).
    """
    D, depth = config.hidden_size, config.depth
    per_block = 3 * D * D + D * D + mlp_macs_per_token(config)  # qkv, proj, MLP
    return depth * per_block + config.token_dim * D + D * config.out_dim  # + patch embedding, final linear


def modulation_macs(config: ModelConfig, chunks: int, final: bool = False) -> int:
    """Multiply-adds of one AdaLN modulation (c (D,) -> chunks * D) of `config.adaln`, as
    fitscale.models.layers.make_modulation builds it."""
    D = config.hidden_size
    if config.adaln == "swiglu":
        hidden = D // 2 if final else (D // 4) * 3
        return 2 * D * hidden + hidden * chunks * D
    if config.adaln == "lora" and not final:
        return D * config.adaln_lora_rank + config.adaln_lora_rank * chunks * D
    return D * chunks * D


def linear_macs_per_image(config: ModelConfig) -> int:
    """Conditioning computed once per image: timestep MLP, block, global and final modulations."""
    D = config.hidden_size
    timestep = TIMESTEP_FEATURES * D + D * D
    modulation = config.depth * modulation_macs(config, 6) + modulation_macs(config, 2, final=True)
    if config.has_global_adaln:
        modulation += D * 6 * D
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
    model for every switch).
    """
    D, depth, hidden = config.hidden_size, config.depth, config.mlp_hidden

    def linear(fan_in: int, fan_out: int, bias: bool = True) -> int:
        return fan_in * fan_out + (fan_out if bias else 0)

    def modulation(chunks: int, final: bool = False) -> int:
        bias = config.adaln_bias
        if config.adaln == "swiglu":
            inner = D // 2 if final else (D // 4) * 3
            return 2 * linear(D, inner, bias) + linear(inner, chunks * D, bias)
        if config.adaln == "lora" and not final:
            r = config.adaln_lora_rank
            return linear(D, r, bias) + linear(r, chunks * D, bias)
        return linear(D, chunks * D, bias)

    def norm(kind: str, dim: int) -> int:
        return (
            dim if kind.startswith("w_") else 0
        )  # no norm has a bias; ModelConfig stores weighted ones as w_

    inputs = 1 if config.mlp == "gelu" else 2
    mlp = inputs * linear(D, hidden, config.mlp_bias) + linear(hidden, D, config.mlp_bias)
    qk_norms = sum(norm(kind, config.head_dim) for kind in (config.q_norm, config.k_norm))
    block = linear(D, 3 * D, config.qkv_bias) + linear(D, D) + mlp + modulation(6) + qk_norms
    block += 2 * norm(config.norm, D)
    label_rows = config.num_classes + int(config.has_null_class)
    return (
        linear(config.token_dim, D)
        + linear(TIMESTEP_FEATURES, D)
        + linear(D, D)
        + label_rows * D
        + (linear(D, 6 * D, config.adaln_bias) if config.has_global_adaln else 0)
        + depth * block
        + linear(D, config.out_dim)
        + modulation(2, final=True)
        + norm(config.norm, D)
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
