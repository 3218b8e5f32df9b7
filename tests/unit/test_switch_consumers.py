"""What the release's switches change outside the network: class_dropout_prob=0 builds no null-class row
(as the release's LabelEmbedder), and what uses it works or refuses in one line (padding segments,
guidance, previews, resume); released FiT v1 files are recognised by convert; the high-res trainable
set applies to a model without the global modulation."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict

import pytest
import torch
from reference.official_fitv2 import official_shapes, reference_config
from reference.pairs import build_fitscale, packed_forward, random_images, reference_config_of

from fitscale.config import ConfigError, load_config, to_yaml
from fitscale.data.batch import pack_images
from fitscale.errors import UserError
from fitscale.flow.guidance import PackedVelocity
from fitscale.models.official import load_official_state_dict
from fitscale.train.resume import check_before_start

BASE = ["data.path=/data/digits", "data.num_classes=10", "model.name=tiny", "train.device=cpu"]


def test_the_label_table_has_the_null_row_only_with_label_dropout():
    without = build_fitscale("tiny", class_dropout_prob=0.0)
    assert without.y_embedder.embedding_table.weight.shape == (10, 64)
    assert build_fitscale("tiny").y_embedder.embedding_table.weight.shape == (11, 64)
    release = {k: torch.zeros(s) for k, s in official_shapes(reference_config_of(without.config)).items()}
    load_official_state_dict(without, release)  # a release checkpoint trained with class_dropout_prob=0


def test_padding_segments_run_without_a_null_class():
    model = build_fitscale("tiny", class_dropout_prob=0.0).eval()
    grids = [(3, 4), (2, 2)]
    images, y = random_images(grids), torch.tensor([9, 0])
    with torch.no_grad():
        padded = packed_forward(model, images, grids, torch.tensor([0.2, 0.9]), y, token_budget=40)
        alone = packed_forward(model, images, grids, torch.tensor([0.2, 0.9]), y)
    for a, b in zip(padded, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_guidance_without_a_null_class_is_refused():
    model = build_fitscale("tiny", class_dropout_prob=0.0).eval()
    layout = pack_images(random_images([(2, 2)]), [(2, 2)], [3], [0], null_class=10)
    PackedVelocity(model, layout, cfg_scale=1.0)  # unguided sampling works
    with pytest.raises(UserError) as error:
        PackedVelocity(model, layout, cfg_scale=4.0)
    assert str(error.value) == (
        "classifier-free guidance scale 4 needs the null class, but the model has model.class_dropout_prob=0 "
        "and so no null-class row: use --cfg 1 (train.sample_cfg_scale=1 for previews) or a model trained "
        "with model.class_dropout_prob > 0"
    )


def test_guided_previews_without_a_null_class_are_refused():
    run = [*BASE, "model.overrides.class_dropout_prob=0.0", "train.sample_every=5"]
    with pytest.raises(ConfigError) as error:
        load_config(None, run)
    assert str(error.value) == (
        "train.sample_cfg_scale=4 guides previews with the null class, but model.class_dropout_prob=0 builds "
        "no null-class row: set train.sample_cfg_scale=1 or model.overrides.class_dropout_prob > 0"
    )
    assert load_config(None, [*run, "train.sample_cfg_scale=1"]).train.sample_every == 5


def test_resume_checks_the_label_rows_of_the_checkpoint(tmp_path):
    """A run saved with the null-class row (class_dropout_prob 0.1, or 0 before the release's rule)
    resumes while the model keeps that row, and is refused in one line naming the fix otherwise."""
    import torch.distributed.checkpoint as dcp

    run = [f"train.run_dir={tmp_path}", *BASE]
    config = load_config(None, run)
    step = tmp_path / "checkpoints" / "step-3"
    table = {"model": {"y_embedder.embedding_table.weight": torch.zeros(11, 64)}}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(table, checkpoint_id=step, no_dist=True)
    metadata = {"format": 1, "step": 3, "world_size": 1, "config": asdict(config)}
    (step / "fitscale.json").write_text(json.dumps(metadata))
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    changed = check_before_start(load_config(None, [*run, "model.overrides.class_dropout_prob=0.2"]))
    assert [str(c) for c in changed] == ["model.class_dropout_prob 0.1 -> 0.2"]
    with pytest.raises(ConfigError) as error:
        check_before_start(load_config(None, [*run, "model.overrides.class_dropout_prob=0.0"]))
    assert str(error.value) == (
        f"cannot resume {step}: its label table has 11 rows and the model builds 10 "
        "(model.class_dropout_prob=0.0, model.null_class=None); set model.overrides.null_class=true to resume it"
    )
    kept = ["model.overrides.class_dropout_prob=0.0", "model.overrides.null_class=true"]
    assert len(check_before_start(load_config(None, [*run, *kept]))) == 2


def test_null_class_false_with_label_dropout_is_refused():
    with pytest.raises(UserError) as error:
        build_fitscale("tiny", null_class=False)
    assert str(error.value) == (
        "model.null_class=false leaves label dropout (model.class_dropout_prob=0.1) no null class to drop to: "
        "set model.class_dropout_prob=0 or leave model.null_class unset"
    )
    assert (
        build_fitscale(
            "tiny", class_dropout_prob=0.0, null_class=True
        ).y_embedder.embedding_table.num_embeddings
        == 11
    )


@pytest.mark.parametrize("name", ["fit-xl", "fit-b", "fitv2-xl"])
def test_convert_recognises_released_fit_v1_files(name):
    from fitscale.checkpoint.export import infer_preset

    with torch.device("meta"):
        released = {k: torch.empty(s) for k, s in official_shapes(reference_config(name)).items()}
    assert infer_preset(released) == name


def test_the_high_res_set_applies_to_a_model_without_global_modulation():
    from fitscale.models.partial import apply_trainable

    with torch.device("meta"):
        from fitscale.models import build_model

        model = build_model("fit-xl", depth=2, hidden_size=64, num_heads=4)
    trainable = apply_trainable(model, "high-res")
    assert trainable == sum(
        p.numel()
        for n, p in model.named_parameters()
        if "adaLN" in n or n.startswith(("x_embedder", "final_layer")) or n.endswith(".bias")
    )


def test_a_released_fit_v1_bin_file_loads_for_sampling(tmp_path):
    """A FiT v1 `model_ema.bin` (a plain state dict in the release's names) through the sampler's loader."""
    from reference.official_fitv2 import random_official_state_dict

    from fitscale.sample.generate import load_sampling_model

    small = dict(depth=2, hidden_size=64, num_heads=4, num_classes=10)
    released = random_official_state_dict(reference_config("fit-xl", **small), seed=5)
    torch.save(released, tmp_path / "model_ema.bin")
    model = load_sampling_model(tmp_path / "model_ema.bin", "fit-xl", small)
    assert model.config.objective == "ddpm" and model.config.out_dim == 32
    loaded = model.state_dict()
    assert set(loaded) == set(released)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in released.items())
