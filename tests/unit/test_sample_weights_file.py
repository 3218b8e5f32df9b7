"""`fitscale sample FILE` of a weights file: which preset it is built as when --model is not given,
and what a file that does not fit the model says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fitscale.checkpoint.export import export_official_state_dict
from fitscale.cli import main
from fitscale.errors import UserError
from fitscale.models import build_model
from fitscale.sample.generate import file_preset

FLAGS = (
    "--set attn_backend=reference --height 32 --width 32 --num-per-size 1 --labels 3 --steps 1 --device cpu"
)


def save_weights(path: Path, model: torch.nn.Module) -> Path:
    from safetensors.torch import save_file

    save_file(export_official_state_dict(model), str(path))
    return path


def test_a_file_matching_one_preset_is_sampled_as_it_and_says_so(tmp_path, capsys):
    torch.manual_seed(0)
    weights = save_weights(tmp_path / "tiny.safetensors", build_model("tiny"))
    assert main(["sample", str(weights), "--out", str(tmp_path / "inferred"), *FLAGS.split()]) == 0
    assert (
        f"{weights}: sampled as --model tiny (the only preset of its width and depth)"
        in capsys.readouterr().err
    )
    named = ["--model", "tiny", *FLAGS.split()]
    assert main(["sample", str(weights), "--out", str(tmp_path / "named"), *named]) == 0
    latents = [np.load(tmp_path / out / "latents" / "000000.npy") for out in ("inferred", "named")]
    assert np.array_equal(*latents)


def test_a_file_matching_several_presets_or_none_asks_for_model():
    with torch.device("meta"):
        xl = build_model("fitv2-xl").state_dict()
    with pytest.raises(UserError) as info:
        file_preset(Path("xl.bin"), xl)  # fitv2-xl-hr has the same shapes and another RoPE
    assert str(info.value) == (
        "xl.bin is a weights file: name its model with --model (fitv2-xl or fitv2-xl-hr: both match its shapes)"
    )
    with pytest.raises(UserError) as info:
        file_preset(Path("odd.bin"), {"x_embedder.proj.weight": torch.zeros(48, 4)})
    assert str(info.value) == "odd.bin is a weights file: name its model with --model (e.g. fitv2-xl)"


def test_a_label_table_one_row_short_or_long_names_the_setting_that_fits(tmp_path, capsys):
    no_null = save_weights(tmp_path / "no_null.safetensors", build_model("tiny", class_dropout_prob=0.0))
    assert main(["sample", str(no_null), "--out", str(tmp_path / "a"), *FLAGS.split()]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "the checkpoint's label table (y_embedder.embedding_table.weight) has 10 rows and the model's 11: it was "
            "saved without a null-class row (class_dropout_prob=0); build the model with class_dropout_prob=0 "
            "(`--set class_dropout_prob=0`, or model.overrides.class_dropout_prob=0 in a run config)"
        )
    )
    fixed = [*FLAGS.split(), "--set", "class_dropout_prob=0"]
    assert main(["sample", str(no_null), "--out", str(tmp_path / "b"), *fixed]) == 0  # the advice works
    with_null = save_weights(tmp_path / "null.safetensors", build_model("tiny"))
    assert main(["sample", str(with_null), "--out", str(tmp_path / "c"), *fixed]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "has 11 rows and the model's 10: it holds a null-class row this model (class_dropout_prob=0) leaves out; "
            "keep it with null_class=true (`--set null_class=true`, or model.overrides.null_class=true in a run config)"
        )
    )
    fixed += ["--set", "null_class=true"]
    assert main(["sample", str(with_null), "--out", str(tmp_path / "d"), *fixed]) == 0
