"""Building blocks of FiTv2: embedders, AdaLN-LoRA modulation, SwiGLU, QK-normed attention.

Parameter names follow the released checkpoints (x_embedder.proj, t_embedder.mlp.0, ...), so
released weights load by name and the high-resolution recipe's trainable set reads the same
as the paper's. Every tensor here is packed: tokens (T, D) of many images, conditioning (S, D)
with one row per image, and `segment_ids` (T,) mapping tokens to their image.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fitscale.models.attention import DocumentMask, varlen_attention
from fitscale.models.rope import apply_rope

TIMESTEP_FEATURES = 256


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x * (1 + scale) + shift, with shift/scale already gathered per token."""
    return torch.addcmul(shift, x, 1 + scale)


def gather_rows(per_image: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """(S, F) -> (T, F): each token's row of its image.

    `index_select`, not `per_image[segment_ids]`: its backward is an `index_add`, where
    indexing's is an accumulating `index_put` that runs 8-14x slower on CPU (measured at
    8192 tokens x 384-1536 features) and sorts the indices first on CUDA in eager mode.
    """
    return per_image.index_select(0, segment_ids)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim with no weight and no bias, as every norm of FiTv2."""
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


class PatchEmbed(nn.Module):
    """Linear(p*p*C -> D) on already patchified tokens."""

    def __init__(self, token_dim: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(token_dim, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, p*p*C) tokens -> (T, D) embeddings."""
        return self.proj(x)  # (T, D)


def shift_time(t: torch.Tensor, shift: float, clamp: bool = False) -> torch.Tensor:
    """t <- s t / (1 + (s - 1) t), capped at 1; s = 1 is the identity. Maps [0, 1] onto itself.

    The release's `time_shifting` (fit/model/fit_model.py, `torch.clamp(..., max=1.0)`), the
    timestep shift of SD3 (Esser et al. 2024, section 5.3.2): s > 1 moves times towards the data
    end, s < 1 towards noise (useful at high resolution, where more of the signal survives a given
    noise level). One map, applied where each `time_shift` field says:
    - `model.time_shift`: to the model's input time before its timestep embedding (the release's);
    - `train.flow.time_shift`: to the training timesteps after they are drawn;
    - `fitscale sample --time-shift`: to the sampler's time grid.

    `clamp=True` caps the result at 1 even at s = 1, as the release's model does for any input
    (a DDPM model fed timestep indices 0..999 sees min(t, 1); `model.time_clamp`).
    """
    if shift == 1.0:
        return t.clamp(max=1.0) if clamp else t
    return torch.clamp(shift * t / (1 + (shift - 1) * t), max=1.0)


class TimestepEmbedder(nn.Module):
    """256 sinusoidal features of t in [0, 1] (cos first, of t itself), then an MLP."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(TIMESTEP_FEATURES, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoidal_features(t: torch.Tensor) -> torch.Tensor:
        """(S,) timesteps in [0, 1] -> (S, 256) float32 features [cos(t f_k), sin(t f_k)], f_k =
        10000^(-k/128).

        Of t itself, not 1000 t; cos first (release: `fit/model/modules.py`, TimestepEmbedder).
        """
        half = TIMESTEP_FEATURES // 2
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000.0) * k / half)  # (128,)
        angles = t.float()[:, None] * freqs[None]  # (S, 128)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (S, 256)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """(S,) timesteps -> (S, D): the sinusoidal features through Linear, SiLU, Linear."""
        features = self.sinusoidal_features(t).to(self.mlp[0].weight.dtype)  # (S, 256)
        return self.mlp(features)  # (S, D)


class LabelEmbedder(nn.Module):
    """Class table with one extra row, the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(S,) int64 labels in [0, num_classes] -> (S, D) embeddings; num_classes is the null class.

        In training mode each label becomes the null class with probability `dropout_prob`, drawn from
        the global RNG (the trainer drops labels per image itself and sets this to 0).
        """
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob  # (S,)
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)  # (S, D)


class SwiGLU(nn.Module):
    """fc2(SiLU(fc1_g x) * fc1_x x), each linear with a bias."""

    def __init__(self, hidden_size: int, mlp_hidden: int):
        super().__init__()
        self.fc1_g = nn.Linear(hidden_size, mlp_hidden)
        self.fc1_x = nn.Linear(hidden_size, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, D): fc2(SiLU(fc1_g x) * fc1_x x), timm's SwiGLU as `fit/model/modules.py` uses it."""
        return self.fc2(F.silu(self.fc1_g(x)) * self.fc1_x(x))  # (T, D)


class Attention(nn.Module):
    """Fused qkv, LayerNorm on q and k per head, 2-D RoPE, per-image varlen attention."""

    def __init__(self, hidden_size: int, num_heads: int, norm_eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm_eps = norm_eps
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, x: torch.Tensor, mask: DocumentMask, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """(T, D) -> (T, D): qkv (layout 3, H, d), LayerNorm on q and k, RoPE with `cos`/`sin` (T, d),
        attention inside each image.

        `packed` says where images begin and which backend runs (fitscale.models.attention);
        release: `fit/model/modules.py`, Attention.
        """
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # (T, 3, H, d)
        q, k, v = qkv.unbind(dim=1)  # each (T, H, d)
        # Under autocast LayerNorm returns fp32: bring q and k back to v's dtype for the kernels.
        q = apply_rope(layer_norm(q, self.norm_eps), cos, sin).to(v.dtype)  # (T, H, d)
        k = apply_rope(layer_norm(k, self.norm_eps), cos, sin).to(v.dtype)  # (T, H, d)
        out = varlen_attention(q, k, v.contiguous(), mask)  # (T, H, d)
        return self.proj(out.flatten(1))  # (T, D)


class FiTBlock(nn.Module):
    """Pre-norm transformer block modulated per image by AdaLN-LoRA plus the global modulation."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, lora_rank: int, norm_eps: float):
        super().__init__()
        self.norm_eps = norm_eps
        self.attn = Attention(hidden_size, num_heads, norm_eps)
        self.mlp = SwiGLU(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, lora_rank), nn.Linear(lora_rank, 6 * hidden_size)
        )

    def forward(
        self,
        x: torch.Tensor,  # (T, D)
        c: torch.Tensor,  # (S, D) conditioning per image
        global_modulation: torch.Tensor,  # (S, 6D)
        mask: DocumentMask,
        cos: torch.Tensor,  # (T, d)
        sin: torch.Tensor,  # (T, d)
    ) -> torch.Tensor:
        """x (T, D) + gate1 * Attn(mod(LN x)) then + gate2 * MLP(mod(LN x)), modulated per image.

        Modulation (S, 6D) = AdaLN-LoRA(c) + `global_modulation`, gathered to tokens and split as
        shift1, scale1, gate1, shift2, scale2, gate2 (release: `fit/model/modules.py`, FiTBlock).
        """
        modulation = self.adaLN_modulation(c) + global_modulation  # (S, 6D)
        modulation = gather_rows(modulation, mask.segment_ids)  # (T, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)  # each (T, D)
        h = modulate(layer_norm(x, self.norm_eps), shift1, scale1)  # (T, D)
        x = x + gate1 * self.attn(h, mask, cos, sin)  # (T, D)
        h = modulate(layer_norm(x, self.norm_eps), shift2, scale2)  # (T, D)
        return x + gate2 * self.mlp(h)  # (T, D)


class FinalLayer(nn.Module):
    """Modulated LayerNorm then Linear(D -> p*p*C): the velocity of every token."""

    def __init__(self, hidden_size: int, token_dim: int, norm_eps: float):
        super().__init__()
        self.norm_eps = norm_eps
        self.linear = nn.Linear(hidden_size, token_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """(T, D) tokens, (S, D) conditioning, (T,) segment ids -> (T, p*p*C) velocity: modulated LN
        then Linear.
        """
        shift, scale = gather_rows(self.adaLN_modulation(c), segment_ids).chunk(2, dim=-1)  # each (T, D)
        return self.linear(modulate(layer_norm(x, self.norm_eps), shift, scale))  # (T, p*p*C)
