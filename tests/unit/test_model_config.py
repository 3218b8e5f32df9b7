"""Presets, parameter counts, override validation and meta-device construction."""

import pytest
import torch

from fitscale.errors import UserError
from fitscale.models import build_config, build_model
from fitscale.models.flops import count_parameters, paper_gflops
from fitscale.models.partial import apply_trainable


@pytest.mark.parametrize(
    "name, expected",
    [
        ("fitv2-b", 128_149_072),
        ("fitv2-xl", 671_045_776),
        ("fitv2-3b", 2_971_928_080),
        ("fitv2-xl-hr", 671_045_776),
        ("fitv2-3b-hr", 2_971_928_080),
    ],
)
def test_parameter_counts_match_the_release(name, expected):
    with torch.device("meta"):
        model = build_model(name)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert count_parameters(model.config) == expected


def test_high_res_trainable_set_is_the_released_one():
    with torch.device("meta"):
        model = build_model("fitv2-xl-hr")
    assert apply_trainable(model, "high-res") == 94_961_680


def test_paper_gflops_convention():
    assert round(paper_gflops(build_config("fitv2-xl"))) == 147
    assert round(paper_gflops(build_config("fitv2-3b"))) == 653
    assert paper_gflops(build_config("fitv2-b")) == pytest.approx(27.3, abs=0.1)


def test_high_res_presets_use_per_image_decoupled_ntk():
    config = build_config("fitv2-xl-hr")
    assert (config.rope_method, config.rope_decoupled, config.rope_per_image, config.rope_base_grid) == (
        "ntk",
        True,
        True,
        16,
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_heads": 5}, "model.num_heads=5 must divide model.hidden_size=64"),
        ({"hidden_size": 72, "num_heads": 12}, "head dim hidden_size/num_heads = 6 must be a multiple of 4"),
        (
            {"rope_method": "ntk2"},
            "model.rope_method: 'ntk2' is not one of none, linear, ntk, ntk_by_parts, yarn, ntk_pro1, ntk_pro2, "
            "normal, ntk-aware, ntk-by-parts, ntk-aware-pro1, ntk-aware-pro2; normal, ntk-aware, ntk-by-parts, "
            "ntk-aware-pro1, ntk-aware-pro2 are the release's names",
        ),
        (
            {"rope_method": "ntk-aware-pro2", "rope_attn_scale": True},
            "model.rope_method='ntk_pro2' already multiplies cos/sin by its own factor: "
            "set model.rope_attn_scale=false",
        ),
        (
            {"rope_method": "ntk_pro1", "rope_base_grid": 1},
            "model.rope_method='ntk_pro1' divides by ln(L0) and model.rope_base_grid=1 makes it 0: "
            "use a base grid of 2 or more",
        ),
        (
            {"rope_method": "yarn", "rope_theta": 1.0},
            "model.rope_theta=1.0 must exceed 1 for model.rope_method='yarn'",
        ),
        (
            {"attn_backend": "xformers"},
            "model.attn_backend: 'xformers' is not one of auto, flash, varlen, flex, grouped, reference, padded",
        ),
        ({"depth": 0}, "model.depth must be positive, got 0"),
        ({"class_dropout_prob": 1.5}, "model.class_dropout_prob must be in [0, 1), got 1.5"),
        ({"widht": 3}, "unknown model field(s) widht"),
        ({"rope_per_image": True, "rope_target_grid": (20, 20)}, "leave model.rope_target_grid unset"),
    ],
)
def test_bad_overrides_name_the_field(overrides, message):
    with pytest.raises(ValueError) as error:
        build_config("tiny", **overrides)
    assert message in str(error.value)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown model 'fitv3'; choose one of tiny, fitv2-b"):
        build_config("fitv3")


def test_meta_build_then_init_weights_matches_a_direct_build():
    torch.manual_seed(3)
    direct = build_model("tiny")
    with torch.device("meta"):
        deferred = build_model("tiny")
    assert all(p.is_meta for p in deferred.parameters())
    deferred.to_empty(device="cpu")
    torch.manual_seed(3)
    deferred.init_weights()
    for (name, a), (_, b) in zip(direct.state_dict().items(), deferred.state_dict().items()):
        assert torch.equal(a, b), name


def test_init_zeroes_the_modulation_and_output_layers():
    model = build_model("tiny")
    zeroed = [
        "global_adaLN_modulation.1",
        "final_layer.linear",
        "final_layer.adaLN_modulation.1",
        "blocks.0.adaLN_modulation.2",
        "blocks.1.adaLN_modulation.2",
    ]
    params = dict(model.named_parameters())
    for prefix in zeroed:
        assert not params[f"{prefix}.weight"].any() and not params[f"{prefix}.bias"].any(), prefix
    assert params["blocks.0.adaLN_modulation.1.weight"].abs().sum() > 0
    assert params["y_embedder.embedding_table.weight"].std().item() == pytest.approx(0.02, rel=0.2)


def test_learn_sigma_needs_the_ddpm_objective():
    with pytest.raises(UserError, match=r"^model.learn_sigma=true needs model.objective=ddpm"):
        build_config("tiny", learn_sigma=True)
    config = build_config("tiny", objective="ddpm", learn_sigma=True)
    assert (config.token_dim, config.out_dim) == (16, 32)
