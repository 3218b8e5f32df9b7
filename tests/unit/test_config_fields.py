"""`fitscale config fields|show`: descriptions read from the config dataclasses' source in all
three forms they use, every field described, and the annotated YAML loading back unchanged."""

import dataclasses

import pytest

from fitscale.config import RunConfig, load_config, to_dict
from fitscale.config.fields import annotated_yaml, describe_run


def test_every_field_is_listed_with_a_description():
    fields = {f.path: f for f in describe_run()}

    def walk(obj, prefix):
        for item in dataclasses.fields(obj):
            value = getattr(obj, item.name)
            yield f"{prefix}{item.name}"
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{item.name}.")

    config = load_config("recipes/demo.yaml")
    expected = set(walk(config, ""))
    assert expected <= set(fields)
    assert set(fields) == expected
    assert [p for p, f in fields.items() if not f.description] == []


def test_descriptions_in_each_source_form():
    fields = {f.path: f for f in describe_run()}
    # attribute docstring
    steps = fields["train.steps"]
    assert (steps.type, steps.default) == ("int", 1000)
    assert (
        steps.description == "Optimizer steps of the whole run (a resumed run continues up to this number)."
    )
    # comment lines above the field
    assert fields["data.token_budget"].description == (
        "Most tokens in one micro-batch: the activation memory of one forward pass."
    )
    # comment at the end of the line; defaults of model fields come from the preset
    depth = fields["model.overrides.depth"]
    assert (depth.description, depth.default) == ("number of transformer blocks", "<the preset's>")
    assert fields["optim.ema"].section and fields["optim.ema.decay"].path == "optim.ema.decay"


def test_one_section_and_an_unknown_one():
    assert {f.path.split(".")[1] for f in describe_run("train.flow")[1:]} == {"flow"}
    with pytest.raises(
        ValueError,
        match=r"^config fields: unknown section 'trian'; sections are: model, model.overrides, data, train, ",
    ):
        describe_run("trian")


def test_annotated_yaml_loads_back_to_the_same_config(tmp_path):
    config = load_config("recipes/demo.yaml", ["train.steps=7", "log.progress_bar=off"])
    text = annotated_yaml(config)
    assert (
        "  # Optimizer steps of the whole run (a resumed run continues up to this number).\n  steps: 7\n"
        in text
    )
    path = tmp_path / "shown.yaml"
    path.write_text(text)
    assert to_dict(load_config(path)) == to_dict(config)
    assert isinstance(config, RunConfig)
