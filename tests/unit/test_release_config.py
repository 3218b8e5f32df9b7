"""The release's network config (configs/fit*/*.yaml network_config.params) as a ModelConfig, and
`fitscale convert official-to-fitscale --release-config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from fitscale.cli import main
from fitscale.config.model import PRESETS, build_config
from fitscale.errors import UserError
from fitscale.models import build_model
from fitscale.models.official import export_official_state_dict, read_release_config, release_model_config

DATA = Path(__file__).parent / "data" / "release_configs"
RELEASE = Path("/tmp/fit_release/configs")  # a checkout of whlzy/FiT, when present
TINY = dict(hidden_size=64, depth=2, num_heads=4, num_classes=10, learn_sigma=False, use_sit=True)


@pytest.mark.parametrize(
    "file, preset", [("config_fit_xl.yaml", "fit-xl"), ("config_fitv2_xl.yaml", "fitv2-xl")]
)
def test_released_configs_map_to_their_presets_exactly(file, preset):
    assert read_release_config(DATA / file) == PRESETS[preset]
    released = RELEASE / ("fit" if preset == "fit-xl" else "fitv2") / file
    if released.is_file():  # the shipped block is the release's, and the whole file reads the same
        shipped = yaml.safe_load((DATA / file).read_text())["network_config"]
        assert shipped == yaml.safe_load(released.read_text())["diffusion"]["network_config"]
        assert read_release_config(released) == PRESETS[preset]


def test_sample_script_rope_overrides_and_release_spellings():
    """sample_fitv2_ddp.py sets custom_freqs / max_pe_len_h/w / decouple / ori_max_pe_len on the params."""
    params = yaml.safe_load((DATA / "config_fitv2_xl.yaml").read_text())["network_config"]["params"]
    params.update(
        custom_freqs="ntk-aware", max_pe_len_h=32, max_pe_len_w=24, decouple=True, ori_max_pe_len=16
    )
    params.update(use_checkpoint=True, pretrain_ckpt="x.bin", ignore_keys=["bias"], finetune="partial")
    config = release_model_config(params)
    assert config == build_config(
        "fitv2-xl", rope_method="ntk", rope_target_grid=(32, 24), rope_decoupled=True, rope_base_grid=16
    )
    mixed = release_model_config(dict(TINY, q_norm="w_rmsnorm", k_norm="LayerNorm", qk_norm_weight=False))
    assert (mixed.q_norm, mixed.k_norm, mixed.mlp, mixed.adaln) == (
        "w_rmsnorm",
        "layernorm",
        "gelu",
        "normal",
    )
    assert release_model_config(dict(TINY, q_norm="layernorm", qk_norm_weight=True)).q_norm == "w_layernorm"
    assert release_model_config(dict(TINY, rel_pos_embed=None, add_rel_pe_to_v=True)).rel_pos_embed == "none"


@pytest.mark.parametrize(
    "params, message",
    [
        (
            dict(TINY, qk_norm=True),
            "release config: unknown key 'qk_norm' (not an argument of the release's FiT)",
        ),
        (
            dict(TINY, q_norm="rmsnorm", qk_norm_weight=True),
            "release config: q_norm='rmsnorm' raises TypeError there (its RMSNorm takes no include_weight); use one "
            "of layernorm, w_layernorm, w_rmsnorm, none or null",
        ),
        (
            dict(TINY, norm_type="np_layernorm"),
            "release config: norm_type='np_layernorm' is unknown; use one of",
        ),
        (dict(TINY, abs_pos_embed="sincos"), "release config: abs_pos_embed='sincos' is not supported"),
        (dict(TINY, adaln_type="lora"), "release config: adaln_type='lora' needs adaln_lora_dim"),
        (dict(TINY, learn_sigma=True), "release config: learn_sigma=true with use_sit=true"),
        (
            dict(TINY, rel_pos_embed="alibi"),
            "release config: rel_pos_embed='alibi' is not one of rope, xpos, null",
        ),
        (
            dict(TINY, custom_freqs="ntk-aware", ori_max_pe_len=16),
            "release config: custom_freqs='ntk-aware' without online_rope needs max_pe_len_h and max_pe_len_w",
        ),
        (dict(TINY, num_heads=5), "release config: model.num_heads=5 must divide model.hidden_size=64"),
    ],
)
def test_what_the_release_cannot_build_is_refused_naming_the_key(params, message):
    with pytest.raises(UserError) as error:
        release_model_config(params)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_convert_with_a_release_config_builds_that_network(tmp_path, capsys):
    """A network that is no preset (w_rmsnorm queries, plain keys, GELU MLP): the weights load strictly
    into it, and the file's metadata names the nearest preset and the overrides that build it."""
    params = dict(TINY, adaln_type="lora", adaln_lora_dim=16, q_norm="w_rmsnorm", k_norm="layernorm")
    (tmp_path / "net.yaml").write_text(yaml.safe_dump({"network_config": {"params": params}}))
    config = release_model_config(params)
    torch.manual_seed(0)
    model = build_model("tiny", mlp="gelu", q_norm="w_rmsnorm")
    assert model.config == config
    torch.save({"ema": export_official_state_dict(model)}, tmp_path / "released.pt")
    out = tmp_path / "ours.safetensors"
    args = ["convert", "official-to-fitscale", str(tmp_path / "released.pt"), str(out), "--json"]
    assert main([*args, "--release-config", str(tmp_path / "net.yaml")]) == 0
    capsys.readouterr()
    assert main([*args[:-1], "--overwrite", "--release-config", str(tmp_path / "net.yaml")]) == 0
    assert "model tiny with --set q_norm=w_rmsnorm mlp=gelu" in capsys.readouterr().out
    with safe_open(str(out), "pt") as converted:
        meta = converted.metadata()
        assert torch.equal(
            converted.get_tensor("blocks.0.attn.q_norm.weight"), model.blocks[0].attn.q_norm.weight
        )
    assert meta["model"] == "tiny" and json.loads(meta["overrides"]) == {"q_norm": "w_rmsnorm", "mlp": "gelu"}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(dict(params, q_norm="rmsnorm")))
    assert main([*args, "--overwrite", "--release-config", str(tmp_path / "bad.yaml")]) == 2
    assert (
        f"release config {tmp_path / 'bad.yaml'}: q_norm='rmsnorm' raises TypeError"
        in capsys.readouterr().err
    )
