"""`--set` means the same in every command: every item of every use, in order; a value may hold `=`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fitscale.sample.generate
from fitscale.cli import build_parser, main

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "demo.yaml")

# Each command's arguments before `--set`; every one takes the same three shapes of `--set`.
COMMANDS = {
    "train": ["train", RECIPE],
    "launch": ["launch", RECIPE, "--dry-run"],
    "info": ["info", "tiny"],
    "sample": ["sample", "runs/x", "--out", "out"],
    "config show": ["config", "show", RECIPE],
}
ITEMS = ["--set", "a.b=1", "--set", "c=2", "d.e=3", "--set", "f=x=y"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_set_item_of_every_use_reaches_the_command_in_order(command):
    args = build_parser().parse_args([*COMMANDS[command], *ITEMS, "--set", "a.b=4"])
    assert args.overrides == ["a.b=1", "c=2", "d.e=3", "f=x=y", "a.b=4"]


def test_config_show_applies_repeated_and_grouped_sets(capsys):
    code = main(
        [
            "config",
            "show",
            RECIPE,
            "--plain",
            "--set",
            "train.steps=7",
            "--set",
            "optim.lr=1e-4",
            "train.seed=5",
        ]
    )
    assert code == 0
    shown = capsys.readouterr().out
    assert "  steps: 7\n" in shown and "  lr: 0.0001\n" in shown and "  seed: 5\n" in shown


def test_sample_nproc_relaunches_with_the_arguments_it_was_given(monkeypatch, tmp_path):
    """`main([...])` from Python relaunches with its own arguments, not the interpreter's sys.argv."""
    import fitscale.runtime.local

    launched = {}
    monkeypatch.setattr(sys, "argv", ["pytest", "-q"])
    monkeypatch.setattr(
        fitscale.runtime.local,
        "launch_local",
        lambda command, nproc: launched.update(command=command, nproc=nproc) or 0,
    )
    argv = ["sample", str(tmp_path / "run"), "--out", str(tmp_path / "out"), "--height", "64", "--width", "64",
            "--nproc", "2", "--set", "attn_backend=reference"]  # fmt: skip
    assert main(argv) == 0
    assert launched["nproc"] == 2
    assert launched["command"][-len(argv) + 2 :] == [a for a in argv if a not in ("--nproc", "2")]


def test_info_applies_repeated_and_grouped_sets(capsys):
    assert (
        main(["info", "tiny", "--set", "depth=3", "--set", "hidden_size=128", "num_heads=8", "--json"]) == 0
    )
    config = json.loads(capsys.readouterr().out)["config"]
    assert (config["depth"], config["hidden_size"], config["num_heads"]) == (3, 128, 8)


def test_info_names_an_item_that_is_not_key_value(capsys):
    assert main(["info", "tiny", "--set", "depth=3", "--set", "hidden_size"]) == 2
    assert capsys.readouterr().err == (
        "fitscale info: error: override 'hidden_size' must look like field=value, e.g. depth=4\n"
    )


def test_launch_applies_repeated_sets_and_values_holding_equals(tmp_path, capsys):
    run_dir = tmp_path / "x"
    code = main(
        ["launch", RECIPE, "--cluster", "local-slurm", "--set", f"train.run_dir={run_dir}",
         "--set", "train.steps=7", "launch.sbatch.comment=a=b", "--set", "optim.lr=1e-4", "--dry-run", "--json"]
    )  # fmt: skip
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["run_dir"] == str(run_dir)
    assert "  steps: 7\n" in plan["config"] and "  lr: 0.0001\n" in plan["config"]
    assert "#SBATCH --comment=a=b\n" in plan["sbatch"]
    assert not run_dir.exists()


def test_sample_hands_every_set_item_to_the_model(tmp_path, monkeypatch):
    seen = {}

    def load_sampling_model(checkpoint, model_name, overrides, **kwargs):
        seen.update(overrides)
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(fitscale.sample.generate, "load_sampling_model", load_sampling_model)
    args = ["sample", str(tmp_path / "w.safetensors"), "--model", "tiny", "--height", "64", "--width", "64"]
    args += ["--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main([*args, "--set", "attn_backend=reference", "--set", "depth=3", "rope_theta=100.0"]) == 2
    assert seen == {"attn_backend": "reference", "depth": 3, "rope_theta": 100.0}


@pytest.mark.slow
def test_train_with_one_set_per_field_runs_where_and_as_asked(tmp_path):
    data = tmp_path / "data=synth"  # a value that holds `=`
    assert (
        main(["data", "synth", str(data), "--num-images", "16", "--num-classes", "10", "--no-progress"]) == 0
    )
    run_dir = tmp_path / "x"
    sets = [f"data.path={data}", f"train.run_dir={run_dir}", "train.steps=2", "checkpoint.interval=0"]
    sets += ["hooks.before=[]", "hooks.after=[]", "data.global_batch_size=8", "log.every=1"]
    command = [sys.executable, "-m", "fitscale.cli", "train", RECIPE]
    for item in sets:
        command += ["--set", item]
    result = subprocess.run(
        [*command, "--nproc", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == (
        f"fitscale train: done at step 2; checkpoint: {run_dir / 'checkpoints' / 'step-2'}; "
        f"metrics: {run_dir / 'metrics.jsonl'}"
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["images"] for r in records if "loss" in r] == [8, 8]
    assert not (tmp_path / "runs").exists(), "the recipe's own run folder must not be touched"
