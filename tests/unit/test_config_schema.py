"""The one config loader: a bad choice or a value of the wrong type is the same one line whether it
comes from a recipe, `--set`, a sweep spec or a cluster profile, and the typed model section builds
the network a preset with the same overrides always built."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fitscale.cli import main
from fitscale.config import ConfigError, load_config, to_yaml
from fitscale.config.model import PRESETS
from fitscale.config.parallel import ParallelConfig
from fitscale.launch.profiles import load_profile
from fitscale.models import build_model
from fitscale.models.fit import FiT
from fitscale.sweep.spec import load_spec

DATA = "data: {path: d, num_classes: 10}\n"
BACKEND = "parallel.backend: 'ddp' is not one of fsdp, deepspeed"
SPEC = "name: s\nrecipe: r.yaml\nout_dir: o\nbudgets: [1.0e+18]\n"


def test_a_bad_choice_is_one_line_from_a_recipe_from_set_and_from_python(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(DATA + "parallel: {backend: ddp}\n")
    with pytest.raises(ConfigError) as from_file:
        load_config(recipe)
    recipe.write_text(DATA)
    with pytest.raises(ConfigError) as from_set:
        load_config(recipe, ["parallel.backend=ddp"])
    with pytest.raises(ConfigError) as from_python:
        ParallelConfig(backend="ddp")
    assert str(from_file.value) == str(from_set.value) == str(from_python.value) == BACKEND


def test_a_bad_choice_in_a_sweep_spec_names_the_file_and_the_item(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC + "mode: bogus\nmodels: [{name: a, preset: tiny}]\n")
    with pytest.raises(ConfigError) as mode:
        load_spec(spec)
    assert str(mode.value) == f"sweep spec '{spec}': mode: 'bogus' is not one of grid, isoflop, steps"
    spec.write_text(SPEC + "models: [{name: a, preset: tiny}, {name: b, preset: fitv2-xxl}]\n")
    with pytest.raises(ConfigError) as preset:
        load_spec(spec)
    assert str(preset.value) == (
        f"sweep spec '{spec}': models[1].preset: 'fitv2-xxl' is not one of "
        "tiny, fitv2-b, fitv2-xl, fitv2-3b, fitv2-xl-hr, fitv2-3b-hr, fit-b, fit-xl"
    )
    spec.write_text(SPEC + "models: [{name: a, preset: tiny, overrides: {depth: abc}}]\n")
    with pytest.raises(ConfigError) as depth:
        load_spec(spec)
    assert str(depth.value) == f"sweep spec '{spec}': models[0].overrides.depth: 'abc' is not an integer"


def test_a_bad_choice_in_a_cluster_profile_names_the_file(tmp_path):
    profile = tmp_path / "gpu.yaml"
    profile.write_text("scheduler: pbs\n")
    with pytest.raises(ConfigError) as error:
        load_profile(str(profile))
    assert str(error.value) == f"cluster profile '{profile}': scheduler: 'pbs' is not one of slurm, local"


def test_a_model_field_of_the_wrong_type_is_one_line_in_train_and_info(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["train", "recipes/demo.yaml", "--set", f"train.run_dir={run_dir}", "model.overrides.depth=abc"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fitscale train: error: model.overrides.depth: 'abc' is not an integer"
    ]
    assert main(["info", "tiny", "--set", "depth=abc"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fitscale info: error: depth: 'abc' is not an integer"
    ]
    assert not run_dir.exists()


def test_a_preset_with_overrides_builds_the_network_the_preset_record_describes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        DATA + "model:\n  name: tiny\n  overrides: {hidden_size: 96, depth: 3, rope_method: ntk-aware}\n"
    )
    config = load_config(recipe, ["model.overrides.attn_backend=reference"])
    # The ModelConfig record changed by the standard library, not by our override path.
    expected = dataclasses.replace(
        PRESETS["tiny"], hidden_size=96, depth=3, rope_method="ntk", attn_backend="reference"
    )
    assert config.model_config() == expected
    torch.manual_seed(0)
    built = build_model(config.model.name, **config.model.overrides)
    torch.manual_seed(0)
    with torch.device("meta"):
        direct = FiT(expected)
    direct.to_empty(device="cpu")
    direct.init_weights()
    assert built.state_dict().keys() == direct.state_dict().keys()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(built.state_dict()[name], tensor), name
    # A large preset, on the meta device: the same parameter shapes as the record built directly.
    config = load_config(None, ["data.path=d", "model.name=fitv2-xl", "model.overrides.depth=2"])
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in build_model("fitv2-xl", **config.model.overrides).named_parameters()}
        reference = FiT(dataclasses.replace(PRESETS["fitv2-xl"], depth=2))
    assert shapes == {n: p.shape for n, p in reference.named_parameters()}


def test_the_saved_config_keeps_only_the_overrides_that_are_set(tmp_path):
    config = load_config("recipes/demo.yaml", ["model.overrides.rope_target_grid=[8,12]"])
    text = to_yaml(config)
    assert "  overrides:\n    hidden_size: 128\n    rope_target_grid:\n    - 8\n    - 12\ndata:" in text
    saved = tmp_path / "config.yaml"
    saved.write_text(text)
    again = load_config(saved)
    assert again == config and again.model_config().rope_target_grid == (8, 12)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("optim.lr=nan", "optim.lr: must be > 0, got nan; the paper uses 1e-4"),
        ("optim.beta2=1.0", "optim.beta2: must be in [0, 1), got 1.0"),
        ("checkpoint.interval=-1", "checkpoint.interval: must be >= 0 (0 disables it), got -1"),
        ("launch.time_min=-5", "launch.time_min: must be >= 0 (or null for the profile's), got -5"),
    ],
)
def test_a_declared_bound_is_checked_where_the_choices_are_with_one_message(item, message):
    """Bounds are field metadata (fitscale.config.bounds), checked by check_choices with the Literals."""
    with pytest.raises(ConfigError) as error:
        load_config("recipes/demo.yaml", [item])
    assert str(error.value) == message
    assert load_config(
        "recipes/demo.yaml", ["launch.time_min=null", "train.val_max_images=null"]
    )  # None passes
    bounded = [f.name for f in dataclasses.fields(ParallelConfig) if "bound" in f.metadata]
    assert sorted(bounded) == ["ac_every", "fsdp_prefetch", "shard_size"]
