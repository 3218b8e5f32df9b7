"""Launching a sweep again: a run folder trained with another config than the spec now plans is refused;
and the model a run is planned and counted with is the model it trains."""

from __future__ import annotations

import dataclasses
import json

import pytest

from fitscale.checkpoint.layout import DCP_METADATA_FILE, write_metadata
from fitscale.cli import main
from fitscale.config import load_config
from fitscale.errors import UserError
from fitscale.models.flops import count_parameters, training_flops
from fitscale.sweep.spec import load_spec, plan_sweep, run_dir, run_overrides

SPEC = """
name: relaunch
recipe: recipes/demo.yaml
out_dir: {out}
mode: grid
models:
  - {{name: w32, preset: tiny, overrides: {{hidden_size: 32, num_heads: 2, adaln_lora_rank: 8}}}}
budgets: [1.0e+9]
global_batch_size: 4
tokens_per_image: 36
overrides: [parallel.sharding=none, checkpoint.interval=0, optim.lr={lr}]
"""


def fake_finished_run(spec_path, lr: float):
    """A run folder whose final checkpoint records the config the spec planned with `lr`."""
    spec = load_spec(spec_path)
    (run,) = plan_sweep(spec)
    config = dataclasses.asdict(load_config(spec.recipe, run_overrides(spec, run)))
    config["optim"]["lr"] = lr
    step = run_dir(spec, run) / "checkpoints" / f"step-{run.steps}"
    step.mkdir(parents=True)
    (step / DCP_METADATA_FILE).write_bytes(b"")
    write_metadata(step, {"step": run.steps, "config": json.loads(json.dumps(config))})
    return run, step


def test_a_finished_run_with_the_planned_config_is_skipped(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "sweep", lr=0.004))
    run, _ = fake_finished_run(spec, 0.004)
    assert main(["sweep", "launch", str(spec), "--local", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {run.name: "done"}


def test_a_run_folder_trained_with_another_config_is_refused_and_kept(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "sweep", lr=0.016))
    run, step = fake_finished_run(spec, 0.004)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "sweep").rglob("*"))
    assert main(["sweep", "launch", str(spec), "--local"]) == 2
    folder = tmp_path / "sweep" / run.name
    assert capsys.readouterr().err.strip() == (
        f"fitscale sweep: error: sweep run {run.name}: {folder} was trained with another config: "
        f"optim.lr was 0.004, the spec now gives 0.016. Set the spec back, or move {folder} aside "
        "(or rename the run) to train it again"
    )
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "sweep").rglob("*")) == before
    # A partly trained run is refused the same way: continuing it would mix two runs.
    (step / DCP_METADATA_FILE).unlink()
    partial = step.with_name("step-1")
    partial.mkdir()
    (partial / DCP_METADATA_FILE).write_bytes(b"")
    write_metadata(partial, json.loads((step / "fitscale.json").read_text()))
    assert main(["sweep", "launch", str(spec), "--local"]) == 2
    assert "optim.lr was 0.004, the spec now gives 0.016" in capsys.readouterr().err


def test_a_run_is_planned_counted_and_trained_as_the_same_model(tmp_path):
    """A sweep model that names no width takes the recipe's model fields (recipes/demo.yaml: width 128):
    refused, naming the field, rather than counted at its preset's width and trained at another. The
    spec's own `model.overrides` lines are meant for every run: counted."""
    body = (
        "name: shapes\nrecipe: recipes/demo.yaml\nout_dir: {out}\nmode: grid\nbudgets: [1.0e+9]\n"
        "tokens_per_image: 36\nmodels:\n  - {{name: w64, preset: tiny{extra}}}\n{lines}"
    )
    spec = tmp_path / "sweep.yaml"
    spec.write_text(body.format(out=tmp_path / "out", extra="", lines=""))
    with pytest.raises(UserError) as error:
        plan_sweep(load_spec(spec))
    assert str(error.value) == (
        "sweep 'shapes', model 'w64': the recipe recipes/demo.yaml sets model.overrides.hidden_size=128, which "
        "would train this model with 612,996 parameters instead of its preset's 171,224; set those fields in the "
        "model's own overrides (the recipe's values to keep them)"
    )
    lines = "overrides: [model.overrides.depth=1, model.overrides.attn_backend=reference]\n"
    spec.write_text(body.format(out=tmp_path / "out", extra=", overrides: {hidden_size: 64}", lines=lines))
    loaded = load_spec(spec)
    (run,) = plan_sweep(loaded)
    trained = load_config(loaded.recipe, run_overrides(loaded, run)).model.config()
    assert (trained.hidden_size, trained.depth, trained.attn_backend) == (64, 1, "reference")
    assert run.parameters == count_parameters(trained) and run.width == 64
    assert run.flops_per_step == training_flops(trained, [36] * run.global_batch_size)


def test_reporting_fields_may_change_on_a_finished_run(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        SPEC.format(out=tmp_path / "sweep", lr=0.004).replace("optim.lr=", "log.every=7, optim.lr=")
    )
    run, _ = fake_finished_run(spec, 0.004)  # saved with the recipe's log.every
    assert main(["sweep", "launch", str(spec), "--local", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {run.name: "done"}


@pytest.mark.parametrize(
    "edit, message",
    [
        ("validation: {max_imgs: 8}\n",
         "sweep 'relaunch': validation: unknown keys ['max_imgs']; known: max_images, seed, timesteps, val_path"),
        ("validation: {timesteps: 0.5}\n",
         "sweep 'relaunch': validation.timesteps must be a list of times in [0, 1], got 0.5"),
        ("validation: {timesteps: [1.5]}\n",
         "sweep 'relaunch': validation timesteps must be a non-empty list in [0, 1], got (1.5,)"),
        ("budgets: [.nan]\n", "sweep 'relaunch': budgets must be finite training FLOPs > 0, got [nan]"),
        ("budgets: [-1.0]\n", "sweep 'relaunch': budgets must be finite training FLOPs > 0, got [-1.0]"),
        ("out_dir: '{tmp}/afile'\n", "sweep 'relaunch': out_dir {tmp}/afile is a file; name a folder for the runs"),
        ("global_batch_size: 0\n",
         "sweep 'relaunch': global_batch_size must be >= 1, got 0 (leave it out for the recipe's)"),
    ],
)  # fmt: skip
def test_bad_spec_values_are_refused_before_anything_trains(tmp_path, edit, message):
    (tmp_path / "afile").write_text("kept")
    text = SPEC.format(out=tmp_path / "sweep", lr=0.004)
    key = edit.split(":")[0]
    text = "\n".join(line for line in text.splitlines() if not line.startswith(key + ":")) + "\n" + edit
    spec = tmp_path / "sweep.yaml"
    spec.write_text(text.replace("{tmp}", str(tmp_path)))
    with pytest.raises(UserError) as error:
        load_spec(spec)
    assert str(error.value) == f"sweep spec '{spec}': {message.replace('{tmp}', str(tmp_path))}"


def test_digits_quality_of_the_ema_on_runs_without_one_is_refused_at_launch(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    text = SPEC.format(out=tmp_path / "sweep", lr=0.004).replace(
        "optim.lr=", "optim.ema.enabled=false, optim.lr="
    )
    spec.write_text(text + "digits_quality: {per_class: 1}\n")
    assert main(["sweep", "launch", str(spec), "--local"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fitscale sweep: error: sweep 'relaunch': digits_quality scores the EMA weights, but run w32-C1e09 trains "
        "with optim.ema.enabled=false; set `ema: false` in digits_quality, or turn the EMA on"
    )
    assert not (tmp_path / "sweep").exists()


def test_collect_before_any_run_trained_says_so_and_writes_nothing(tmp_path, capsys):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(SPEC.format(out=tmp_path / "sweep", lr=0.004))
    assert main(["sweep", "collect", str(spec), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fitscale sweep: error: sweep 'relaunch': no run has a checkpoint under {tmp_path / 'sweep'} yet; run "
        "`fitscale sweep launch` first"
    )
    assert not (tmp_path / "sweep").exists()
