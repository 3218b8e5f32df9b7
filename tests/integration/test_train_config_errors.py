"""`fitscale train` with a bad recipe or override: exit 2, one line that names the field and the fix,
before any process starts or anything is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fitscale.cli import main

CASES = {
    "optim.lr=-1": ("optim.lr: must be > 0, got -1.0",),
    "train.stepz=5": ("unknown config key 'train.stepz'", "fields of section 'train'"),
    "trainer.steps=5": ("unknown config key 'trainer'", "top-level sections are: model, data, train"),
    "train.steps=many": ("train.steps", "many"),
    "parallel.backend=zero": ("parallel.backend: 'zero' is not one of fsdp, deepspeed",),
    "data.num_classes=7": ("data.num_classes=7", "set model.overrides.num_classes=7"),
    "model.overrides.depth_=3": (
        "unknown config key 'model.overrides.depth_'",
        "the fields of section 'model.overrides': hidden_size, depth,",
    ),
    "parallel.compile=true": ("parallel.compile=true needs static shapes: set data.pad_to_budget=true",),
    "train.resume=latest": ("train.resume: 'latest' is not `auto`, `never` or a step number",),
    "train.trainable=[blocks.*.atn.*]": (
        "train.trainable: trainable pattern 'blocks.*.atn.*' matches no parameter",
        "names look like ['x_embedder.proj.weight'",
    ),
    "train.steps": ("override 'train.steps' must look like section.field=value",),
    "train.val_every=10": ("train.val_every=10 needs a held-out split: set data.val_path",),
    "train.val_max_images=0": ("train.val_max_images: must be >= 1 (or null for the whole split), got 0",),
}


@pytest.mark.parametrize("override", list(CASES))
def test_a_bad_setting_is_named_in_one_line_with_exit_2(override, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main(["train", "recipes/demo.yaml", "--set", f"train.run_dir={run_dir}", override])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fitscale train: error: "), err
    for fragment in CASES[override]:
        assert fragment in lines[0], lines[0]
    assert not run_dir.exists(), "a refused run must not create its folder"


def test_a_missing_validation_split_is_named_before_any_process_starts(tmp_path, capsys):
    run_dir, missing = tmp_path / "run", tmp_path / "no_val"
    overrides = [f"train.run_dir={run_dir}", "train.val_every=10", f"data.val_path={missing}"]
    assert main(["train", "recipes/demo.yaml", "--set", *overrides]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"fitscale train: error: data.val_path={missing} holds no dataset (no fitscale.json); write the "
        "held-out split with `fitscale data ...` or set train.val_every=0"
    ]
    assert not run_dir.exists()


def test_a_missing_recipe_is_named_by_the_installed_command(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "train", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"fitscale train: error: recipe {str(missing)!r} does not exist"
