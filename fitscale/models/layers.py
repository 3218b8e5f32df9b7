"""Building blocks of FiT: embedders, AdaLN modulation, MLPs, QK-normed attention, per the config's switches.

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

from fitscale.config.model import ModelConfig
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


class RMSNorm(nn.Module):
    """The release's RMSNorm (fit/model/norms.py): (x * rsqrt(mean(x^2) + eps)) in fp32, cast back to
    x's dtype, times `weight` (D,)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D), normalised over the last dim."""
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """The release's create_norm of a stored ModelConfig norm name: 'layernorm' (no weight, no bias),
    'w_layernorm' (weight, no bias), 'w_rmsnorm' or 'none' (ModelConfig stores weighted norms as w_...)."""
    if kind == "none":
        return nn.Identity()
    if kind == "w_rmsnorm":
        return RMSNorm(dim, eps)
    return nn.LayerNorm(dim, eps=eps, elementwise_affine=kind == "w_layernorm", bias=False)


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
    """Class table, with one extra row, the null class of classifier-free guidance, when `null_class`
    (by default when `dropout_prob` > 0, the release's LabelEmbedder: `num_classes + (dropout_prob > 0)`
    rows)."""

    def __init__(
        self, num_classes: int, hidden_size: int, dropout_prob: float, null_class: bool | None = None
    ):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.has_null_class = dropout_prob > 0 if null_class is None else null_class
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null_class), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """(S,) int64 labels in [0, num_classes] -> (S, D) embeddings; num_classes is the null class.

        In training mode each label becomes the null class with probability `dropout_prob`, drawn from
        the global RNG (the trainer drops labels per image itself and sets this to 0). With no null row
        (dropout_prob = 0) the label num_classes, which only padding segments carry (their outputs are
        discarded; guidance refuses such a model), reads the last class's row.
        """
        if not self.has_null_class:
            return self.embedding_table(y.clamp(max=self.num_classes - 1))  # (S, D)
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob  # (S,)
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)  # (S, D)


class SwiGLU(nn.Module):
    """timm's SwiGLU as the release uses it: fc2(SiLU(fc1_g x) * fc1_x x), out width `out_features`."""

    def __init__(self, in_features: int, hidden: int, out_features: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1_g = nn.Linear(in_features, hidden, bias=bias)
        self.fc1_x = nn.Linear(in_features, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, out_features or in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out): fc2(SiLU(fc1_g x) * fc1_x x)."""
        return self.fc2(F.silu(self.fc1_g(x)) * self.fc1_x(x))


class GeluMlp(nn.Module):
    """timm's Mlp as the release's FiT uses it without SwiGLU: fc2(GELU_tanh(fc1 x))."""

    def __init__(self, hidden_size: int, mlp_hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden, bias=bias)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, D)."""
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def make_mlp(config: ModelConfig) -> nn.Module:
    """The block's MLP of `config.mlp` (swiglu and swiglu_large differ only in the hidden width)."""
    if config.mlp == "gelu":
        return GeluMlp(config.hidden_size, config.mlp_hidden, config.mlp_bias)
    return SwiGLU(config.hidden_size, config.mlp_hidden, bias=config.mlp_bias)


def make_modulation(config: ModelConfig, chunks: int, final: bool = False) -> nn.Module:
    """c (S, D) -> (S, chunks * D) modulation of `config.adaln` (release FiTBlock / FinalLayer):
    normal SiLU + Linear; lora SiLU + Linear(D, r) + Linear(r, 6D) in blocks (normal in the final
    layer); swiglu a SwiGLU with no SiLU before it, hidden (D // 4) * 3 in blocks and D // 2 in the
    final layer."""
    D, bias = config.hidden_size, config.adaln_bias
    if config.adaln == "swiglu":
        return SwiGLU(D, D // 2 if final else (D // 4) * 3, chunks * D, bias=bias)
    if config.adaln == "lora" and not final:
        r = config.adaln_lora_rank
        return nn.Sequential(nn.SiLU(), nn.Linear(D, r, bias=bias), nn.Linear(r, chunks * D, bias=bias))
    return nn.Sequential(nn.SiLU(), nn.Linear(D, chunks * D, bias=bias))


def last_linear(modulation: nn.Module) -> nn.Linear:
    """The output linear of a `make_modulation` module, zeroed by the release's initialisation."""
    return modulation.fc2 if isinstance(modulation, SwiGLU) else modulation[-1]


class Attention(nn.Module):
    """Fused qkv, the q/k norms of the config per head, 2-D RoPE (or none), per-image varlen attention."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(D, 3 * D, bias=config.qkv_bias)
        self.q_norm = make_norm(config.q_norm, config.head_dim, config.norm_eps)
        self.k_norm = make_norm(config.k_norm, config.head_dim, config.norm_eps)
        self.proj = nn.Linear(D, D)
        self.rope = config.rel_pos_embed == "rope"
        self.rope_on_values = config.rope_on_values

    def forward(
        self, x: torch.Tensor, mask: DocumentMask, cos: torch.Tensor | None, sin: torch.Tensor | None
    ) -> torch.Tensor:
        """(T, D) -> (T, D): qkv (layout 3, H, d), the q/k norms, RoPE with `cos`/`sin` (T, d) on q and k
        (and v with rope_on_values), attention inside each image.

        `mask` says where images begin and which backend runs (fitscale.models.attention);
        release: `fit/model/modules.py`, Attention.
        """
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, -1))  # (T, 3, H, d)
        q, k, v = qkv.unbind(dim=1)  # each (T, H, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if self.rope_on_values:
                v = apply_rope(v, cos, sin)
        # Under autocast LayerNorm returns fp32: bring q and k back to v's dtype for the kernels.
        out = varlen_attention(q.to(v.dtype), k.to(v.dtype), v.contiguous(), mask)  # (T, H, d)
        return self.proj(out.flatten(1))  # (T, D)


class FiTBlock(nn.Module):
    """Pre-norm transformer block modulated per image by AdaLN (plus the global modulation, if any)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D, eps = config.hidden_size, config.norm_eps
        self.norm1 = make_norm(config.norm, D, eps)
        self.norm2 = make_norm(config.norm, D, eps)
        self.attn = Attention(config)
        self.mlp = make_mlp(config)
        self.adaLN_modulation = make_modulation(config, 6)

    def forward(
        self,
        x: torch.Tensor,  # (T, D)
        c: torch.Tensor,  # (S, D) conditioning per image
        global_modulation: torch.Tensor | None,  # (S, 6D), None when the model has none
        mask: DocumentMask,
        cos: torch.Tensor | None,  # (T, d); None without RoPE
        sin: torch.Tensor | None,  # (T, d)
    ) -> torch.Tensor:
        """x (T, D) + gate1 * Attn(mod(norm1 x)) then + gate2 * MLP(mod(norm2 x)), modulated per image.

        Modulation (S, 6D) = AdaLN(c) + `global_modulation`, gathered to tokens and split as
        shift1, scale1, gate1, shift2, scale2, gate2 (release: `fit/model/modules.py`, FiTBlock).
        """
        modulation = self.adaLN_modulation(c)  # (S, 6D)
        if global_modulation is not None:
            modulation = modulation + global_modulation
        modulation = gather_rows(modulation, mask.segment_ids)  # (T, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)  # each (T, D)
        h = modulate(self.norm1(x), shift1, scale1)  # (T, D)
        x = x + gate1 * self.attn(h, mask, cos, sin)  # (T, D)
        h = modulate(self.norm2(x), shift2, scale2)  # (T, D)
        return x + gate2 * self.mlp(h)  # (T, D)


class FinalLayer(nn.Module):
    """Modulated norm then Linear(D -> out_dim): the prediction for every token."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        D = config.hidden_size
        self.norm_final = make_norm(config.norm, D, config.norm_eps)
        self.linear = nn.Linear(D, config.out_dim)
        self.adaLN_modulation = make_modulation(config, 2, final=True)

    def forward(self, x: torch.Tensor, c: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        """(T, D) tokens, (S, D) conditioning, (T,) segment ids -> (T, out_dim): modulated norm then
        Linear.
        """
        shift, scale = gather_rows(self.adaLN_modulation(c), segment_ids).chunk(2, dim=-1)  # each (T, D)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (T, out_dim)
