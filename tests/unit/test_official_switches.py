"""Every switch of the release's FiT class: fitscale's packed forward computes the reference's padded one.

The reference (tests/reference/official_fitv2.py) is the release's FiT class with every switch, written
from its formulas; each case loads the same random non-zero weights (the release's zero-initialised
layers included) into both by the release's names, runs several images of different grids packed in
one batch, and compares each image's output: ||fitscale - release|| / ||release|| < 1e-5 in fp32.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference.official_fitv2 import official_shapes, reference_config
from reference.pairs import build_fitscale, build_pair, packed_forward, random_images, reference_forward
from reference.pairs import relative_error as rel_error
from torch import nn

from fitscale.config.model import build_config
from fitscale.errors import UserError
from fitscale.models import build_model
from fitscale.models.flops import count_parameters, linear_macs_per_image, linear_macs_per_token, paper_gflops

TOLERANCE = 1e-5  # fp32; measured <= 3.4e-7 over CASES under ATEN_CPU_CAPABILITY=default, avx2 and avx512
GRIDS = [(4, 4), (3, 5), (2, 7), (1, 3)]
SMALL = dict(hidden_size=64, num_heads=4, depth=2, num_classes=10, adaln_lora_rank=16)
DDPM_INDICES = torch.tensor([0.0, 1.0, 500.0, 999.0])  # the release clamps min(t, 1) for any input

# (preset, overrides): each release switch on its own, then combinations and the FiT v1 presets.
CASES = [
    ("tiny", dict(q_norm="rmsnorm", qk_norm_weight=True)),
    ("tiny", dict(q_norm="layernorm", k_norm="rmsnorm", qk_norm_weight=True)),
    ("tiny", dict(q_norm="none", k_norm="layernorm")),
    ("tiny", dict(q_norm="none", k_norm="none")),
    ("tiny", dict(q_norm="w_rmsnorm", k_norm="layernorm")),  # the release's create_norm names, mixed
    ("tiny", dict(q_norm="layernorm", k_norm="w_layernorm", norm="w_rmsnorm")),
    ("tiny", dict(q_norm="none", k_norm="none", qk_norm_weight=True)),  # the release builds a no-op
    ("tiny", dict(norm="rmsnorm", norm_weight=True)),
    ("tiny", dict(norm="layernorm", norm_weight=True)),
    ("tiny", dict(norm="none")),
    ("tiny", dict(adaln="normal")),
    ("tiny", dict(adaln="swiglu")),
    ("tiny", dict(adaln="swiglu", adaln_bias=False)),
    ("tiny", dict(adaln_bias=False)),
    ("tiny", dict(mlp="gelu")),
    ("tiny", dict(mlp="swiglu_large", mlp_ratio=2.5)),
    ("tiny", dict(mlp="gelu", mlp_ratio=3.0, mlp_bias=False, qkv_bias=False)),
    ("tiny", dict(rel_pos_embed="none")),
    ("tiny", dict(rel_pos_embed="none", rope_on_values=True)),  # add_rel_pe_to_v acts in the rope branch only
    ("tiny", dict(rel_pos_embed="xpos", rope_on_values=True)),
    ("tiny", dict(class_dropout_prob=0.0)),
    ("tiny", dict(time_shift=3.0)),
    ("tiny", dict(objective="ddpm", learn_sigma=True, adaln="normal", norm="none", q_norm="none", k_norm="none")),
    ("tiny", dict(adaln="swiglu", mlp="gelu", norm="rmsnorm", norm_weight=True, q_norm="rmsnorm",
                  k_norm="rmsnorm", qk_norm_weight=True, rope_on_values=True, class_dropout_prob=0.0)),
    ("fit-xl", SMALL),
    ("fit-b", dict(SMALL, hidden_size=48, num_heads=3, class_dropout_prob=0.0)),
    ("fit-xl", dict(SMALL, rope_method="ntk-aware", rope_per_image=True, rope_base_grid=3)),
]  # fmt: skip


def case_id(case) -> str:
    name, overrides = case
    shown = {k: v for k, v in overrides.items() if k not in SMALL}
    return name + ("-" + "-".join(f"{k}={v}" for k, v in shown.items()) if shown else "")


def forward_both(name: str, overrides: dict, t: torch.Tensor, seed: int = 0):
    model, reference, _ = build_pair(name, seed=seed, **overrides)
    config = model.config
    images = random_images(GRIDS, config.token_dim, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, config.num_classes, (len(GRIDS),), generator=generator)
    if config.has_null_class:
        y[-1] = config.num_classes  # the null class of guidance
    with torch.no_grad():
        ours = packed_forward(model, images, GRIDS, t, y, token_budget=64)  # with padding segments
        theirs = reference_forward(reference, images, GRIDS, t, y, limit=16)
    return model, ours, theirs


@pytest.mark.numeric
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_switch_matches_release(case):
    name, overrides = case
    config = build_config(name, **overrides)
    t = DDPM_INDICES if config.objective == "ddpm" else torch.tensor([0.0, 0.3, 0.77, 1.0])
    model, ours, theirs = forward_both(name, overrides, t)
    assert ours[0].shape == (16, config.out_dim)
    errors = [rel_error(a, b) for a, b in zip(ours, theirs)]
    assert max(errors) < TOLERANCE, f"relative error per image {dict(zip(GRIDS, errors))}"
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())


@pytest.mark.numeric
def test_ddpm_indices_are_clamped_like_the_release():
    """A v1 model fed indices 0..999 sees min(t, 1): every index >= 1 gives the output of t = 1."""
    overrides = dict(SMALL, depth=1)
    _, at_indices, _ = forward_both("fit-xl", overrides, torch.tensor([5.0, 1.0, 999.0, 1.0]))
    _, at_one, _ = forward_both("fit-xl", overrides, torch.ones(4))
    for a, b in zip(at_indices, at_one):
        assert torch.equal(a, b)
    unclamped = build_pair("fit-xl", **overrides, time_clamp=False)[0]
    clamped = build_pair("fit-xl", **overrides)[0]  # the same seed: the same weights
    images, y = random_images(GRIDS[:1]), torch.tensor([3])
    with torch.no_grad():
        free = packed_forward(unclamped, images, GRIDS[:1], torch.tensor([999.0]), y)[0]
        capped = packed_forward(clamped, images, GRIDS[:1], torch.tensor([999.0]), y)[0]
    assert not torch.equal(free, capped)


@pytest.mark.parametrize(
    "name, expected",
    [("fit-xl", 823_599_392), ("fit-b", 158_664_224)],  # the release README: FiTv1-XL/2 824M
)
def test_fit_v1_parameter_counts(name, expected):
    assert (
        sum(map(lambda s: torch.Size(s).numel(), official_shapes(reference_config(name)).values()))
        == expected
    )
    assert count_parameters(build_config(name)) == expected
    assert round(expected / 1e6) == (824 if name == "fit-xl" else 159)


def test_fit_v1_xl_gflops_near_the_readme():
    # The README's 153 GFLOPs for FiTv1-XL/2; our linear-layer convention gives 152.4 (FiTv2-XL: 146.9 vs 147).
    assert paper_gflops(build_config("fit-xl")) == pytest.approx(153, abs=0.7)


def test_init_weights_is_the_releases_per_switch():
    model = build_fitscale("tiny", adaln="swiglu", norm="rmsnorm", norm_weight=True, q_norm="rmsnorm",
                           qk_norm_weight=True, adaln_bias=False)  # fmt: skip
    assert model.global_adaLN_modulation is None  # only adaln=lora has it (release)
    block = model.blocks[0]
    assert not block.adaLN_modulation.fc2.weight.any() and block.adaLN_modulation.fc1_g.weight.any()
    assert block.adaLN_modulation.fc2.bias is None
    assert not model.final_layer.adaLN_modulation.fc2.weight.any()
    assert torch.equal(block.norm1.weight, torch.ones(64)) and torch.equal(
        block.attn.q_norm.weight, torch.ones(16)
    )
    assert not model.final_layer.linear.weight.any()
    forced = build_fitscale("tiny", adaln="normal", adaln_global=True)
    assert not forced.global_adaLN_modulation[-1].weight.any()
    assert build_fitscale("tiny", adaln_global=False).global_adaLN_modulation is None


def test_release_names_of_the_fit_v1_preset():
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in build_model("fit-xl", depth=2).state_dict().items()}
    assert ours == official_shapes(reference_config("fit-xl", depth=2))
    assert "y_embedder.embedding_table.weight" in ours and ours["final_layer.linear.weight"] == (32, 1152)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(q_norm="rmsnorm"),
            "model.q_norm=rmsnorm needs model.qk_norm_weight=true: the release's unweighted q_norm='rmsnorm' "
            "raises TypeError (its RMSNorm takes no include_weight); set model.qk_norm_weight=true (its "
            "w_rmsnorm), write w_rmsnorm, or use layernorm",
        ),
        (
            dict(norm="rmsnorm"),
            "model.norm=rmsnorm needs model.norm_weight=true: the release's unweighted norm_type='rmsnorm' "
            "raises TypeError (its RMSNorm takes no include_weight); set model.norm_weight=true (its "
            "w_rmsnorm), write w_rmsnorm, or use layernorm",
        ),
        (dict(norm="none", norm_weight=True), "model.norm_weight=true has no effect with model.norm=none"),
        (dict(mlp_ratio=0.0), "model.mlp_ratio must be positive, got 0.0"),
        (dict(adaln="adalora"), "model.adaln: 'adalora' is not one of lora, normal, swiglu"),
        (dict(mlp="geglu"), "model.mlp: 'geglu' is not one of swiglu, swiglu_large, gelu"),
    ],
)
def test_undefined_combinations_are_refused(overrides, message):
    with pytest.raises(ValueError) as error:
        build_config("tiny", **overrides)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_norms_are_stored_as_the_releases_create_norm_names():
    """Weight flags fold into the names as the release's modules.py does: one stored form per network."""
    flagged = build_config(
        "tiny", q_norm="layernorm", k_norm="rmsnorm", qk_norm_weight=True, norm_weight=True
    )
    named = build_config("tiny", q_norm="w_layernorm", k_norm="w_rmsnorm", norm="w_layernorm")
    assert flagged == named
    assert (named.q_norm, named.k_norm, named.norm, named.qk_norm_weight) == (
        "w_layernorm",
        "w_rmsnorm",
        "w_layernorm",
        False,
    )
    assert build_config("tiny", q_norm="w_rmsnorm", qk_norm_weight=True).q_norm == "w_rmsnorm"
    assert build_config("tiny", **dataclasses.asdict(named)) == named  # stored form reloads unchanged


def test_xpos_is_stored_as_rope():
    assert build_config("tiny", rel_pos_embed="xpos").rel_pos_embed == "rope"
    with pytest.raises(UserError):
        build_config("tiny", q_norm="rmsnorm", k_norm="layernorm")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_flop_counts_follow_the_built_layers(case):
    """Per-token and per-image multiply-adds of flops.py equal those of the model's own Linear layers."""
    name, overrides = case
    with torch.device("meta"):
        model = build_model(name, **overrides)
    per_token = per_image = 0
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            macs = module.in_features * module.out_features
            if "adaLN_modulation" in module_name or module_name.startswith("t_embedder"):
                per_image += macs
            else:
                per_token += macs
    assert linear_macs_per_token(model.config) == per_token
    assert linear_macs_per_image(model.config) == per_image
