"""The released FiT class's padded computation (FiTv2 and FiT v1, every switch), re-implemented
independently to test fitscale against.

The switches follow whlzy/FiT fit/model/fit_model.py, modules.py and norms.py: norm_type, q_norm,
k_norm, qk_norm_weight (create_norm), adaln_type, use_swiglu(_large), mlp_ratio, *_bias,
rel_pos_embed, add_rel_pe_to_v, learn_sigma, time_shifting and the clamp of the input time at 1.

Written from `shared/reference/fitv2-official.md` alone, in the release's layout: every image is
padded to a fixed token limit N, attention is a dense N x N softmax under a boolean mask in which a
token sees exactly the tokens on its own side of the padding boundary (real with real, padding
with padding, as the release builds it), and RoPE is computed per image from the release's `grid`
(2, N: column then row) and `size` (rows, cols). Parameter names and shapes are the release's, so
a state dict of this module is a state dict in the released format.

Nothing here is fast or shared with fitscale: it is slow on purpose, so that a bug in fitscale's
packed path cannot hide behind the same bug here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .release_rope import RopeSpec, image_cos_sin, rotate_pairs


@dataclass(frozen=True)
class ReferenceConfig:
    """The release's FiT arguments (fit/model/fit_model.py), under its own names and values."""

    depth: int
    hidden_size: int
    num_heads: int
    lora_rank: int = 0  # adaln_lora_dim
    num_classes: int = 1000
    in_channels: int = 4
    patch_size: int = 2
    class_dropout_prob: float = 0.1
    rope: RopeSpec = field(default_factory=RopeSpec)
    mlp_ratio: float = 4.0
    learn_sigma: bool = False
    use_swiglu: bool = True
    use_swiglu_large: bool = False
    rel_pos_embed: str | None = "rope"  # 'rope' / 'xpos' rotate q and k; anything else: no RoPE
    add_rel_pe_to_v: bool = False
    norm_type: str | None = "layernorm"  # create_norm names: layernorm, w_layernorm, w_rmsnorm, rmsnorm, none
    q_norm: str | None = "layernorm"
    k_norm: str | None = "layernorm"
    qk_norm_weight: bool = False
    qkv_bias: bool = True
    ffn_bias: bool = True
    adaln_bias: bool = True
    adaln_type: str = "lora"  # normal, lora, swiglu
    time_shifting: float = 1.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def token_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def out_dim(self) -> int:
        return self.token_dim * (2 if self.learn_sigma else 1)

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        return hidden if self.use_swiglu_large or not self.use_swiglu else (hidden * 2) // 3


HR_ROPE = RopeSpec(custom_freqs="ntk-aware", decouple=True, online_rope=True, ori_max_pe_len=16)
# configs/fit/config_fit_xl.yaml: everything else at the FiT class's defaults.
FIT_V1 = dict(
    use_swiglu_large=True, learn_sigma=True, adaln_type="normal", q_norm=None, k_norm=None, lora_rank=0
)
PRESETS = {
    "fitv2-b": ReferenceConfig(depth=15, hidden_size=768, num_heads=12, lora_rank=192),
    "fitv2-xl": ReferenceConfig(depth=36, hidden_size=1152, num_heads=16, lora_rank=288),
    "fitv2-3b": ReferenceConfig(depth=40, hidden_size=2304, num_heads=24, lora_rank=576),
    "fitv2-xl-hr": ReferenceConfig(depth=36, hidden_size=1152, num_heads=16, lora_rank=288, rope=HR_ROPE),
    "fitv2-3b-hr": ReferenceConfig(depth=40, hidden_size=2304, num_heads=24, lora_rank=576, rope=HR_ROPE),
    "fit-xl": ReferenceConfig(depth=28, hidden_size=1152, num_heads=16, **FIT_V1),
    "fit-b": ReferenceConfig(depth=12, hidden_size=768, num_heads=12, **FIT_V1),
}


def reference_config(name: str, **overrides) -> ReferenceConfig:
    """A preset with fields replaced, e.g. `reference_config("fitv2-xl", depth=2)`."""
    return replace(PRESETS[name], **overrides)


# ----------------------------------------------------------------------------- modules


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


class RMSNorm(nn.Module):
    """fit/model/norms.py RMSNorm: weighted, normalised in float32 and cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def create_norm(norm_type: str | None, dim: int) -> nn.Module:
    """fit/model/norms.py create_norm, eps 1e-6, including its TypeError for plain 'rmsnorm'."""
    if norm_type is None or norm_type == "" or norm_type.lower() == "none":
        return nn.Identity()
    kind = norm_type.lower()
    if kind == "w_layernorm":
        return nn.LayerNorm(dim, eps=1e-6, bias=False)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False, bias=False)
    if kind == "w_rmsnorm":
        return RMSNorm(dim)
    if kind == "rmsnorm":  # the release calls RMSNorm(dim, include_weight=False, eps=eps)
        raise TypeError("RMSNorm.__init__() got an unexpected keyword argument 'include_weight'")
    raise NotImplementedError(f"Unknown norm_type: '{norm_type}'")


class PatchEmbedder(nn.Module):
    def __init__(self, token_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(token_dim, hidden)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        k = torch.arange(128, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(10000) * k / 128)
        args = t.float()[:, None] * freqs[None, :]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=1))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, hidden: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        hidden, self.num_heads = config.hidden_size, config.num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=config.qkv_bias)
        q_norm, k_norm = config.q_norm, config.k_norm
        if q_norm == "layernorm" and config.qk_norm_weight:
            q_norm = "w_layernorm"
        if k_norm == "layernorm" and config.qk_norm_weight:
            k_norm = "w_layernorm"
        self.q_norm = create_norm(q_norm, config.head_dim)
        self.k_norm = create_norm(k_norm, config.head_dim)
        self.proj = nn.Linear(hidden, hidden)
        self.rope = (config.rel_pos_embed or "").lower() in ("rope", "xpos")
        self.rope_v = config.add_rel_pe_to_v

    def forward(self, x, mask2d, cos, sin):
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            if self.rope_v:
                v = v * cos[:, None] + rotate_pairs(v) * sin[:, None]
            q = q * cos[:, None] + rotate_pairs(q) * sin[:, None]
            k = k * cos[:, None] + rotate_pairs(k) * sin[:, None]
        logits = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (B, H, N, N)
        logits = logits.masked_fill(~mask2d[:, None], float("-inf"))
        out = logits.softmax(dim=-1) @ v  # (B, H, N, d)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    """timm.layers.SwiGLU (norm and dropouts are identities in the release)."""

    def __init__(self, hidden: int, inner: int, out: int | None = None, bias: bool = True):
        super().__init__()
        self.fc1_g = nn.Linear(hidden, inner, bias=bias)
        self.fc1_x = nn.Linear(hidden, inner, bias=bias)
        self.fc2 = nn.Linear(inner, out or hidden, bias=bias)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1_g(x)) * self.fc1_x(x))


class Mlp(nn.Module):
    """timm.layers.Mlp with GELU(approximate='tanh')."""

    def __init__(self, hidden: int, inner: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inner, bias=bias)
        self.fc2 = nn.Linear(inner, hidden, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def adaln(config: ReferenceConfig, final: bool) -> nn.Module:
    """FiTBlock / FinalLayer adaLN_modulation of the release, by adaln_type."""
    D, bias, chunks = config.hidden_size, config.adaln_bias, 2 if final else 6
    if config.adaln_type == "swiglu":
        return SwiGLU(D, D // 2 if final else (D // 4) * 3, chunks * D, bias=bias)
    if config.adaln_type == "lora" and not final:
        r = config.lora_rank
        return nn.Sequential(nn.SiLU(), nn.Linear(D, r, bias=bias), nn.Linear(r, 6 * D, bias=bias))
    return nn.Sequential(nn.SiLU(), nn.Linear(D, chunks * D, bias=bias))


class Block(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        D = config.hidden_size
        self.norm1 = create_norm(config.norm_type, D)
        self.norm2 = create_norm(config.norm_type, D)
        self.attn = Attention(config)
        if config.use_swiglu:
            self.mlp = SwiGLU(D, config.mlp_hidden, bias=config.ffn_bias)
        else:
            self.mlp = Mlp(D, config.mlp_hidden, bias=config.ffn_bias)
        self.adaLN_modulation = adaln(config, final=False)

    def forward(self, x, c, global_mod, mask2d, cos, sin):
        mod = self.adaLN_modulation(c) + global_mod
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), mask2d, cos, sin)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, config: ReferenceConfig):
        super().__init__()
        self.norm_final = create_norm(config.norm_type, config.hidden_size)
        self.linear = nn.Linear(config.hidden_size, config.out_dim)
        self.adaLN_modulation = adaln(config, final=True)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class OfficialFiTv2(nn.Module):
    """The release's FiT class with every switch, run the release's way: padded to N tokens, dense
    masked attention. The global modulation exists only with adaln_type 'lora', as in the release."""

    def __init__(self, config: ReferenceConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.x_embedder = PatchEmbedder(config.token_dim, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        if config.adaln_type == "lora":
            self.global_adaLN_modulation = nn.Sequential(
                nn.SiLU(), nn.Linear(D, 6 * D, bias=config.adaln_bias)
            )
        else:
            self.global_adaLN_modulation = None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)

    def forward(self, x, t, y, grid, mask, size):
        """x (B, N, p*p*C) padded tokens, t (B,) (clamped at 1 after the shift, as the release does for
        any input), y (B,), grid (B, 2, N) column/row, mask (B, N) real, size (B, 2) rows/cols ->
        (B, N, out_dim) (padding positions carry garbage)."""
        s = self.config.time_shifting
        t = torch.clamp(s * t / (1 + (s - 1) * t), max=1.0).float()
        mask = mask.bool()
        mask2d = mask[:, :, None] == mask[:, None, :]  # (B, N, N): real<->real, pad<->pad
        cos_sin = [
            image_cos_sin(self.config.rope, self.config.head_dim, grid[b].cpu(), tuple(size[b].tolist()))
            for b in range(x.shape[0])
        ]
        cos = torch.stack([c for c, _ in cos_sin]).to(x.device, x.dtype)  # (B, N, d)
        sin = torch.stack([s for _, s in cos_sin]).to(x.device, x.dtype)  # (B, N, d)
        h = self.x_embedder.proj(x)  # (B, N, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D)
        global_mod = 0.0 if self.global_adaLN_modulation is None else self.global_adaLN_modulation(c)
        for block in self.blocks:
            h = block(h, c, global_mod, mask2d, cos, sin)  # (B, N, D)
        return self.final_layer(h, c)  # (B, N, out_dim)


# ----------------------------------------------------------------------------- data helpers


def pad_images(
    images: list[torch.Tensor], grids: list[tuple[int, int]], limit: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (rows*cols, 16) row-major -> the release's padded (x, grid, mask, size)."""
    B, dim = len(images), images[0].shape[1]
    x = images[0].new_zeros(B, limit, dim)
    grid = torch.zeros(B, 2, limit, dtype=torch.int64)
    mask = torch.zeros(B, limit, dtype=torch.bool)
    for b, (image, (rows, cols)) in enumerate(zip(images, grids)):
        n = rows * cols
        if n > limit:
            raise ValueError(f"image {b} has {n} tokens, over the limit of {limit}")
        x[b, :n] = image
        grid[b, 0, :n] = torch.arange(cols).repeat(rows)  # column index
        grid[b, 1, :n] = torch.arange(rows).repeat_interleave(cols)  # row index
        mask[b, :n] = True
    size = torch.tensor(grids, dtype=torch.int64).reshape(B, 2)
    return x, grid, mask, size


def unpad(out: torch.Tensor, grids: list[tuple[int, int]]) -> list[torch.Tensor]:
    return [out[b, : rows * cols] for b, (rows, cols) in enumerate(grids)]


def official_shapes(config: ReferenceConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape, without allocating (built on the meta device)."""
    with torch.device("meta"):
        model = OfficialFiTv2(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def random_official_state_dict(config: ReferenceConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp32 weights in the release's names where every entry is non-zero.

    Weights ~ N(0, 1/fan_in) keep activations O(1) at any depth; the zero-initialised layers of the
    release (modulations, final linear) get small random values so that every path is exercised.
    """
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in official_shapes(config).items():
        if len(shape) == 2 and "embedding_table" not in name:
            std = shape[1] ** -0.5
        elif "embedding_table" in name:
            std = 1.0
        else:
            std = 0.1
        if "adaLN_modulation" in name:
            std *= 0.5
        mean = 1.0 if "norm" in name else 0.0  # norm weights around 1, as trained ones are
        value = torch.empty(shape).normal_(mean, std, generator=generator)
        state[name] = value.masked_fill_(value == 0, std)  # every parameter non-zero, exactly
    return state
