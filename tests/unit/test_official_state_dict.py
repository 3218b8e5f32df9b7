"""Loading and exporting the released checkpoints' names, and reading their files safely."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from reference.official_fitv2 import official_shapes, random_official_state_dict, reference_config
from reference.pairs import build_fitscale, reference_config_of


@pytest.fixture
def tiny():
    model = build_fitscale("tiny")
    return model, random_official_state_dict(reference_config_of(model.config), seed=5)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def test_export_round_trips_exactly(tiny):
    from fitscale.models.official import export_official_state_dict, load_official_state_dict

    model, state = tiny
    load_official_state_dict(model, state)
    exported = export_official_state_dict(model)
    assert set(exported) == set(state)
    for name, value in state.items():
        assert exported[name].dtype == value.dtype and torch.equal(exported[name], value), name
    fresh = build_fitscale("tiny")
    load_official_state_dict(fresh, exported)
    before, after = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_export_has_the_release_names_and_shapes():
    from fitscale.models.official import export_official_state_dict

    model = build_fitscale("fitv2-xl", depth=2)
    shapes = {name: tuple(value.shape) for name, value in export_official_state_dict(model).items()}
    assert shapes == official_shapes(reference_config("fitv2-xl", depth=2))


def _missing(state):
    del state["blocks.1.mlp.fc2.bias"]
    return "blocks.1.mlp.fc2.bias"


def _extra(state):
    state["blocks.2.attn.qkv.weight"] = state["blocks.1.attn.qkv.weight"].clone()
    return "blocks.2.attn.qkv.weight"


def _misshaped(state):
    state["final_layer.linear.weight"] = state["final_layer.linear.weight"][:, :-1].clone()
    return "final_layer.linear.weight"


@pytest.mark.parametrize("corrupt", [_missing, _extra, _misshaped], ids=["missing", "extra", "misshaped"])
def test_bad_state_dict_names_the_key_and_leaves_the_model_untouched(tiny, corrupt):
    from fitscale.models.official import load_official_state_dict

    model, state = tiny
    key = corrupt(state)
    before = snapshot(model)
    with pytest.raises((KeyError, ValueError, RuntimeError)) as error:
        load_official_state_dict(model, state)
    assert key in str(error.value)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before), "a failed load changed weights"


@pytest.mark.parametrize("suffix", [".safetensors", ".bin", ".pt"])
def test_checkpoint_files_are_read_back_exactly(tiny, tmp_path, suffix):
    from safetensors.torch import save_file

    from fitscale.models.official import load_official_state_dict, read_checkpoint_file

    model, state = tiny
    path = tmp_path / f"FiTv2-tiny{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    read = read_checkpoint_file(path)
    assert set(read) == set(state) and all(torch.equal(read[name], state[name]) for name in state)
    load_official_state_dict(model, read)


class _Payload:
    """A pickle that runs code when loaded: what a hostile .bin from the internet would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_bin_files_are_never_unpickled_freely(tmp_path):
    from fitscale.models.official import read_checkpoint_file

    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile.bin"
    torch.save({"x_embedder.proj.weight": _Payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(Exception):  # noqa: B017 - any refusal will do; running the payload will not
        read_checkpoint_file(path)
    assert not marker.exists()


def test_wrapped_model_names_come_back_to_the_plain_names():
    """Activation checkpointing, torch.compile and a DDP-style leading `module.` add name segments;
    clean names are the plain model's, and a wrapped state dict loads into a plain model."""
    from fitscale.models import build_model
    from fitscale.models.official import clean_parameter_name, load_official_state_dict
    from fitscale.parallel.ac import apply_ac

    tiny = build_model("tiny")
    plain = [name for name, _ in tiny.named_parameters()]
    wrapped = build_model("tiny")
    apply_ac(wrapped, "full")
    compiled = torch.compile(wrapped)  # compiles on first call only
    names = [name for name, _ in compiled.named_parameters()]
    assert any("._checkpoint_wrapped_module." in n for n in names) and names[0].startswith("_orig_mod.")
    assert [clean_parameter_name(name) for name in names] == plain
    assert (
        clean_parameter_name("module.module._orig_mod.blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"
    )
    load_official_state_dict(tiny, {f"module.{k}": v for k, v in compiled.state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), wrapped.state_dict().values()))
    assert not all(
        torch.equal(a, b)
        for a, b in zip(build_model("tiny").state_dict().values(), tiny.state_dict().values())
    )
