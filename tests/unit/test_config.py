"""RunConfig loading: recipes, overrides, unknown keys and cross-section errors."""

import pytest

from fitscale.config import ConfigError, load_config

DATA = ["data.path=somewhere", "data.num_classes=10"]


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: tiny}\ndata: {path: d, num_classes: 10}\ntrain: {steps: 7}\n")
    config = load_config(recipe, ["train.steps=9", "parallel.activation_checkpointing=full"])
    assert config.train.steps == 9 and config.parallel.activation_checkpointing == "full"


def test_demo_recipe_loads():
    config = load_config("recipes/demo.yaml")
    assert config.model.name == "tiny" and config.parallel.backend == "fsdp"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("trian.steps=3", "unknown config key 'trian'; top-level sections are"),
        ("train.steps=0", "train.steps: must be >= 1, got 0"),
        ("parallel.backend=ddp", "parallel.backend: 'ddp' is not one of fsdp, deepspeed"),
        (
            "parallel.fsdp_prefetch=-1",
            "parallel.fsdp_prefetch: must be >= 0 (0 = FSDP2's own schedule), got -1",
        ),
        ("train.flow.timesteps=cosine", "train.flow.timesteps: 'cosine' is not one of logit_normal, uniform"),
        ("model.overrides.num_classes=5", "data.num_classes=10 but the model has num_classes=5"),
        ("parallel.compile=true", "parallel.compile=true needs static shapes: set data.pad_to_budget=true"),
    ],
)
def test_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(None, [*DATA, override])
    assert message in str(info.value)


def test_micro_batches_per_step_is_refused_where_it_would_be_ignored():
    with pytest.raises(ConfigError) as info:
        load_config("recipes/demo.yaml", ["data.micro_batches_per_step=4"])  # demo: batch_mode=images
    assert str(info.value) == (
        "data.micro_batches_per_step=4 applies to data.batch_mode=tokens only; with data.batch_mode=images "
        "the micro-batches follow from data.global_batch_size and data.token_budget: remove it, or set "
        "data.batch_mode=tokens"
    )
    tokens = load_config("recipes/demo.yaml", ["data.micro_batches_per_step=4", "data.batch_mode=tokens"])
    assert tokens.data.micro_batches_per_step == 4


def test_missing_data_section():
    with pytest.raises(ConfigError, match="set data.path"):
        load_config(None, [])
