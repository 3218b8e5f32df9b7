"""The model section of a run, and ModelConfig with the named presets of the FiT family (v2 and v1).

A preset is a complete ModelConfig; `build_config(name, **overrides)` copies it with overrides
and validates the result, so every model in a run is described by one flat, typed record that
a recipe can override field by field. ModelConfig lives here, with the other sections, below the
network that `fitscale.models` builds from it.

The run's `model` section is a preset name plus typed overrides: `model.overrides` has one field
per `ModelConfig` field, of the same type (a tuple becomes a list, as YAML writes it), so a recipe
or `--set model.overrides.depth=abc` is checked like every other section. An override left at null
keeps the preset's value. The fields, their types and descriptions are read from ModelConfig
itself, the one definition.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args

from fitscale.config.errors import ConfigError
from fitscale.config.schema import check_choices, choice_message
from fitscale.errors import UserError

# The release's `custom_freqs` values (whlzy/FiT fit/model/rope.py), accepted as spellings of ours.
RELEASE_ROPE_METHODS = {
    "normal": "none",
    "linear": "linear",
    "ntk-aware": "ntk",
    "ntk-by-parts": "ntk_by_parts",
    "yarn": "yarn",
    "ntk-aware-pro1": "ntk_pro1",
    "ntk-aware-pro2": "ntk_pro2",
}
# Ours first, then the release's spellings that differ (stored as ours).
RopeMethod = Literal[
    "none", "linear", "ntk", "ntk_by_parts", "yarn", "ntk_pro1", "ntk_pro2",
    "normal", "ntk-aware", "ntk-by-parts", "ntk-aware-pro1", "ntk-aware-pro2",
]  # fmt: skip
ROPE_METHODS = tuple(dict.fromkeys(RELEASE_ROPE_METHODS.values()))  # ours
RELEASE_SPELLINGS = (
    f"{', '.join(n for n in RELEASE_ROPE_METHODS if n not in ROPE_METHODS)} are the release's names"
)
# The names registered in fitscale.models.attention.BACKENDS, and auto (a test keeps them equal).
AttentionBackendName = Literal["auto", "flash", "varlen", "flex", "grouped", "reference", "padded"]
ATTENTION_BACKENDS = get_args(AttentionBackendName)


# The release's create_norm names (fit/model/norms.py): layernorm has no weight, w_layernorm and w_rmsnorm
# do; "rmsnorm" is written with a weight flag (ours: the release's unweighted rmsnorm cannot be built).
NormKind = Literal["layernorm", "w_layernorm", "w_rmsnorm", "rmsnorm", "none"]
# (kind field, its weight flag, the release's argument)
NORM_FIELDS = (("q_norm", "qk_norm_weight", "q_norm"), ("k_norm", "qk_norm_weight", "k_norm"),
               ("norm", "norm_weight", "norm_type"))  # fmt: skip


def canonical_norm(field_name: str, kind: str, weight: bool, release: str) -> str:
    """The stored create_norm name of a norm field given its weight flag: the release's own rule
    (modules.py: layernorm + qk_norm_weight -> w_layernorm; w_ names stay weighted whatever the flag),
    and rmsnorm + flag -> w_rmsnorm (ours: the release keeps 'rmsnorm' and fails to build it).

    UserError (one line) for rmsnorm without the flag: the release's unweighted 'rmsnorm' calls
    `RMSNorm(dim, include_weight=False)`, which its RMSNorm does not accept (TypeError).
    """
    if kind == "rmsnorm" and not weight:
        weight_field = dict((k, w) for k, w, _ in NORM_FIELDS)[field_name]
        raise UserError(
            f"model.{field_name}=rmsnorm needs model.{weight_field}=true: the release's unweighted "
            f"{release}='rmsnorm' raises TypeError (its RMSNorm takes no include_weight); set "
            f"model.{weight_field}=true (its w_rmsnorm), write w_rmsnorm, or use layernorm"
        )
    if weight and kind in ("layernorm", "rmsnorm"):
        return f"w_{kind}"
    return kind


def check_switches(config: ModelConfig) -> None:
    """Store the norms as create_norm names (`canonical_norm`) with the weight flags folded in (stored
    false), so each network has one stored form; UserError (one line) for a combination
    of architecture switches the release cannot build. Combinations it builds as no-ops are accepted:
    qk_norm_weight with both q/k norms off, rope_on_values without RoPE (its add_rel_pe_to_v acts
    only inside the rope branch).
    """
    if config.norm_weight and config.norm == "none":
        raise UserError("model.norm_weight=true has no effect with model.norm=none")
    for kind_field, weight_field, release in NORM_FIELDS:
        kind = canonical_norm(kind_field, getattr(config, kind_field), getattr(config, weight_field), release)
        object.__setattr__(config, kind_field, kind)
    for _, weight_field, _ in NORM_FIELDS:  # folded into the names: one stored form per network
        object.__setattr__(config, weight_field, False)
    if config.null_class is False and config.class_dropout_prob > 0:
        raise UserError(
            f"model.null_class=false leaves label dropout (model.class_dropout_prob={config.class_dropout_prob}) "
            "no null class to drop to: set model.class_dropout_prob=0 or leave model.null_class unset"
        )


def canonical_rope_method(name: str) -> str:
    """Our name of a RoPE method given ours or the release's `custom_freqs` (any case);
    ConfigError (a ValueError) listing both spellings otherwise (`model.rope_method: ...`)."""
    lowered = str(name).lower()
    if lowered not in get_args(RopeMethod):
        raise ConfigError(choice_message("model.rope_method", name, get_args(RopeMethod), RELEASE_SPELLINGS))
    return RELEASE_ROPE_METHODS.get(lowered, lowered)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one FiT network (FiTv2 by default; every switch of the release's FiT class)."""

    hidden_size: int = 1152  # D: width of every token
    depth: int = 36  # number of transformer blocks
    num_heads: int = 16  # H; head dim d = D / H
    adaln_lora_rank: int = 288  # r of the per-block AdaLN-LoRA (D -> r -> 6D)
    mlp_hidden_size: int | None = None  # MLP hidden width; None: from mlp_ratio as released (`mlp_hidden`)
    patch_size: int = 2  # p: a token covers p x p latent pixels
    in_channels: int = 4  # C: latent channels; a token carries p*p*C values
    # Label classes; index num_classes is the null class for guidance (a table row only when class_dropout_prob > 0).
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # labels replaced by the null class in training mode
    time_shift: float = 1.0  # s of models.layers.shift_time before the timestep embedding; 1 = identity
    norm_eps: float = 1e-6  # eps of every LayerNorm (blocks, QK-norm, final layer)
    # RoPE: 2-D, half the head dims for rows and half for columns.
    rope_theta: float = 10000.0
    # rope_method: training-free extrapolation, one of ROPE_METHODS or the release's custom_freqs name
    # (normal, ntk-aware, ntk-by-parts, ntk-aware-pro1, ntk-aware-pro2), stored as ours.
    rope_method: RopeMethod = field(default="none", metadata={"hint": RELEASE_SPELLINGS})
    rope_decoupled: bool = False  # scale rows and columns separately (release `decouple`; paper "Vision")
    rope_attn_scale: bool = False  # multiply cos/sin by sqrt(log(2hw)/log(L0^2)) when 2hw > L0^2
    rope_per_image: bool = False  # frequencies from each image's own grid (release `online_rope`)
    rope_base_grid: int = 16  # L0 (release `ori_max_pe_len`): training grid edge, 16 for 256 tokens
    # (rows, cols) of fixed frequencies (release `max_pe_len_h/w`); None: the L0 x L0 grid (no scaling)
    rope_target_grid: tuple[int, int] | None = None
    attn_backend: AttentionBackendName = "auto"  # `padded` is the release's dense attention
    # What the network predicts and which time it reads (release `use_sit` / `learn_sigma`):
    # `flow`: velocity at t in [0, 1], 1 = data (FiTv2, the release's use_sit=true);
    # `ddpm`: epsilon at the timestep index t in [0, diffusion_steps), 0 = data (FiT v1, improved-diffusion).
    objective: Literal["flow", "ddpm"] = "flow"
    learn_sigma: bool = False  # ddpm only: also output the variance interpolation values (2x token_dim)
    # The release clamps the (shifted) input time at 1.0 whatever the objective (fit_model.py forward):
    # a ddpm model then sees min(t, 1). False feeds indices unclamped, as the original FiT code did.
    time_clamp: bool = True
    # Architecture switches of the release's FiT class (fit/model/fit_model.py, modules.py, norms.py);
    # the defaults are FiTv2's. docs/architecture.md maps each to the release's argument.
    # Norms: the release's create_norm names, stored weighted (w_...) when the weight flag is set.
    q_norm: NormKind = "layernorm"  # norm of each head's queries (release q_norm)
    k_norm: NormKind = "layernorm"  # norm of each head's keys (release k_norm)
    # qk_norm_weight / norm_weight: layernorm, rmsnorm -> w_... there; folded into the names, stored false.
    qk_norm_weight: bool = False  # weighted q/k norms (release qk_norm_weight)
    norm: NormKind = "layernorm"  # norm1, norm2 and the final norm (release norm_type)
    norm_weight: bool = False  # weighted block/final norms (ours; the release writes norm_type=w_...)
    adaln: Literal["lora", "normal", "swiglu"] = "lora"  # per-block modulation (release adaln_type)
    # The global modulation Linear(D, 6D) added to every block's: None = the release's rule (iff adaln=lora);
    # true/false forces it (ours, not in the release).
    adaln_global: bool | None = None
    adaln_bias: bool = True  # biases of the modulation linears (release adaln_bias)
    mlp: Literal["swiglu", "swiglu_large", "gelu"] = "swiglu"  # release use_swiglu / use_swiglu_large
    mlp_ratio: float = 4.0  # MLP hidden = int(D * mlp_ratio); swiglu takes 2/3 of that (release mlp_ratio)
    mlp_bias: bool = True  # biases of the MLP linears (release ffn_bias)
    qkv_bias: bool = True  # bias of the qkv projection (release qkv_bias)
    # Relative position embedding: 2-D RoPE or none (release rel_pos_embed; its 'xpos' is RoPE, stored as rope).
    rel_pos_embed: Literal["rope", "none", "xpos"] = "rope"
    rope_on_values: bool = False  # rotate the values too (release add_rel_pe_to_v)
    # The null-class row of the label table: None = the release's rule (only when class_dropout_prob > 0);
    # true keeps it at class_dropout_prob=0 (ours: how fitscale built every model before, for such runs).
    null_class: bool | None = None

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")

        for name in (
            "hidden_size",
            "depth",
            "num_heads",
            "adaln_lora_rank",
            "patch_size",
            "in_channels",
            "num_classes",
            "rope_theta",
            "rope_base_grid",
            "time_shift",
            "mlp_ratio",
        ):
            positive(name)
        if self.mlp_hidden_size is not None:
            positive("mlp_hidden_size")
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size}; "
                f"pick heads from {[h for h in range(1, 65) if self.hidden_size % h == 0]}"
            )
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 4:
            raise UserError(
                f"head dim hidden_size/num_heads = {head_dim} must be a multiple of 4: 2-D RoPE gives half "
                f"of it to rows and half to columns, and each half (= {head_dim / 2:g}) must be even"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise UserError(f"model.class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        object.__setattr__(self, "rope_method", canonical_rope_method(self.rope_method))
        check_choices(self, "model.")
        if self.rel_pos_embed == "xpos":  # the release computes 'xpos' exactly as 'rope'
            object.__setattr__(self, "rel_pos_embed", "rope")
        check_switches(self)
        if self.learn_sigma and self.objective != "ddpm":
            raise UserError(
                "model.learn_sigma=true needs model.objective=ddpm: a flow model predicts one velocity per "
                "value (the release asserts not (learn_sigma and use_sit))"
            )
        if self.rope_method not in ("none", "linear") and self.head_dim // 2 <= 2:
            raise UserError(f"model.rope_method={self.rope_method!r} needs a head dim above 4")
        if self.rope_method not in ("none", "linear") and self.rope_theta <= 1:
            raise UserError(
                f"model.rope_theta={self.rope_theta} must exceed 1 for model.rope_method={self.rope_method!r}"
            )
        if self.rope_attn_scale and self.rope_method in ("ntk_pro1", "ntk_pro2"):
            raise UserError(
                f"model.rope_method={self.rope_method!r} already multiplies cos/sin by its own factor: "
                "set model.rope_attn_scale=false"
            )
        if self.rope_base_grid == 1 and (
            self.rope_attn_scale or self.rope_method in ("ntk_pro1", "ntk_pro2")
        ):
            scaled = (
                "model.rope_attn_scale" if self.rope_attn_scale else f"model.rope_method={self.rope_method!r}"
            )
            raise UserError(
                f"{scaled} divides by ln(L0) and model.rope_base_grid=1 makes it 0: use a base grid of 2 or more"
            )
        if self.rope_target_grid is not None:
            grid = tuple(self.rope_target_grid)
            if len(grid) != 2 or min(grid) <= 0:
                raise UserError(
                    f"model.rope_target_grid must be (rows, cols) > 0, got {self.rope_target_grid}"
                )
            object.__setattr__(self, "rope_target_grid", (int(grid[0]), int(grid[1])))
        if self.rope_per_image and self.rope_target_grid is not None:
            raise UserError(
                "model.rope_per_image=true takes each image's grid: leave model.rope_target_grid unset"
            )

    @property
    def head_dim(self) -> int:
        """d = hidden_size / num_heads, the per-head width (72 for FiTv2-XL)."""
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """MLP hidden width: `mlp_hidden_size`, else the release's int(D * mlp_ratio), of which `swiglu`
        takes 2/3 (floor): 3072 for FiTv2-XL (D = 1152), 4608 for FiT v1-XL (swiglu_large).
        """
        if self.mlp_hidden_size:
            return self.mlp_hidden_size
        hidden = int(self.hidden_size * self.mlp_ratio)
        return hidden * 2 // 3 if self.mlp == "swiglu" else hidden

    @property
    def has_global_adaln(self) -> bool:
        """Whether the global modulation Linear(D, 6D) exists: `adaln_global`, else the release's rule
        (only with adaln=lora)."""
        return self.adaln == "lora" if self.adaln_global is None else self.adaln_global

    @property
    def has_null_class(self) -> bool:
        """Whether the label table has the null-class row `num_classes` (guidance, label dropout):
        `null_class`, else the release's LabelEmbedder rule, only when class_dropout_prob > 0."""
        return self.class_dropout_prob > 0 if self.null_class is None else self.null_class

    @property
    def token_dim(self) -> int:
        """Values per token: p * p * C (16 for the released models)."""
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def out_dim(self) -> int:
        """Values the network outputs per token: token_dim, twice that with `learn_sigma` (the
        epsilon first, then the variance interpolation values, release `out_channels = 2 C`)."""
        return self.token_dim * (2 if self.learn_sigma else 1)

    def replace(self, **overrides) -> ModelConfig:
        """A copy with `overrides` applied and validated (ValueError naming unknown fields or bad values)."""
        return build_config_from(self, overrides)


# FiT v1 (configs/fit/config_fit_xl.yaml): large SwiGLU, plain AdaLN, no QK-norm, improved-diffusion
# DDPM with learned variances; its RoPE is 'normal' (no extrapolation), as FiTv2's.
_V1 = dict(
    mlp="swiglu_large", adaln="normal", q_norm="none", k_norm="none", objective="ddpm", learn_sigma=True
)
# FiTv2 (configs/fitv2/*.yaml): the release's switches, stated explicitly.
_V2 = dict(
    mlp="swiglu", adaln="lora", q_norm="layernorm", k_norm="layernorm", norm="layernorm", objective="flow"
)
_HIGH_RES = dict(rope_method="ntk", rope_decoupled=True, rope_per_image=True, rope_base_grid=16)

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden_size=64, depth=2, num_heads=4, adaln_lora_rank=16, num_classes=10),
    "fitv2-b": ModelConfig(hidden_size=768, depth=15, num_heads=12, adaln_lora_rank=192, **_V2),
    "fitv2-xl": ModelConfig(hidden_size=1152, depth=36, num_heads=16, adaln_lora_rank=288, **_V2),
    "fitv2-3b": ModelConfig(hidden_size=2304, depth=40, num_heads=24, adaln_lora_rank=576, **_V2),
    "fitv2-xl-hr": ModelConfig(
        hidden_size=1152, depth=36, num_heads=16, adaln_lora_rank=288, **_V2, **_HIGH_RES
    ),
    "fitv2-3b-hr": ModelConfig(
        hidden_size=2304, depth=40, num_heads=24, adaln_lora_rank=576, **_V2, **_HIGH_RES
    ),
    "fit-b": ModelConfig(hidden_size=768, depth=12, num_heads=12, **_V1),
    "fit-xl": ModelConfig(hidden_size=1152, depth=28, num_heads=16, **_V1),
}


def build_config(name: str, **overrides) -> ModelConfig:
    """The preset `name` with `overrides` applied and validated; an override of None keeps the
    preset's value (`model.overrides` of a run config holds every field, None where unset).
    ValueError names an unknown preset or field, or the field whose value is wrong."""
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(PRESETS)}")
    return build_config_from(PRESETS[name], {k: v for k, v in overrides.items() if v is not None})


def build_config_from(base: ModelConfig, overrides: dict) -> ModelConfig:
    """`base` with `overrides` (field name -> value) applied; `__post_init__` validates the result.

    Raises ValueError naming every unknown field (and listing the valid ones) or the first invalid value.
    """
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UserError(
            f"unknown model field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}"
        )
    return dataclasses.replace(base, **overrides)


def preset_names() -> list[str]:
    """Names of the model presets, in definition order (tiny, fitv2-b, fitv2-xl, fitv2-3b, *-hr, fit-b, fit-xl)."""
    return list(PRESETS)


__all__ = [
    "ModelConfig",
    "PRESETS",
    "RELEASE_ROPE_METHODS",
    "ROPE_METHODS",
    "build_config",
    "canonical_rope_method",
    "check_switches",
    "preset_names",
]


PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]  # the names of PRESETS


def _override_type(kind: Any) -> Any:
    """`Optional[kind]`, with `tuple[int, int]` read as `list[int]` (what YAML and OmegaConf hold)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1:
        kind = args[0]
    if typing.get_origin(kind) is tuple:
        kind = list[typing.get_args(kind)[0]]
    return Optional[kind]  # noqa: UP045 (a runtime type object, not an annotation)


class _SetFields(Mapping):
    """Read as a mapping of the fields that are set (not None), so `build_config(name, **overrides)`
    and `dict(overrides)` see only the changes."""

    def _set(self) -> dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }

    def __getitem__(self, key: str) -> Any:
        return self._set()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._set())

    def __len__(self) -> int:
        return len(self._set())

    def __post_init__(self) -> None:
        check_choices(self, "model.overrides.")

    def __repr__(self) -> str:
        return f"ModelOverrides({', '.join(f'{k}={v!r}' for k, v in self.items())})"


ModelOverrides = dataclass(repr=False)(
    types.new_class(
        "ModelOverrides",
        (_SetFields,),
        exec_body=lambda ns: ns.update(
            __module__=__name__,
            __doc__="ModelConfig fields that differ from the preset's; null keeps the preset's value.",
            __annotations__={
                name: _override_type(kind) for name, kind in typing.get_type_hints(ModelConfig).items()
            },
            **{f.name: field(default=None, metadata=f.metadata) for f in dataclasses.fields(ModelConfig)},
            _field_source=ModelConfig,  # where fitscale.config.fields reads each field's description
        ),
    )
)


@dataclass
class ModelSection:
    """Which network: a preset of `fitscale.models` plus overrides of its ModelConfig fields."""

    name: PresetName = "tiny"
    """Preset of `PRESETS` (above) that the overrides change."""
    overrides: ModelOverrides = field(default_factory=ModelOverrides)
    """ModelConfig fields to change, e.g. {class_dropout_prob: 0.0, attn_backend: reference}."""

    def __post_init__(self) -> None:
        check_choices(self, "model.")

    def config(self) -> ModelConfig:
        """The validated ModelConfig: the preset with the overrides that are set; ConfigError naming
        the field otherwise."""
        try:
            return build_config(self.name, **self.overrides)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"model: {error} (set model.name / model.overrides.<field>)") from error
