"""Launching a sweep again: a run folder trained with another config than the spec now plans is refused."""

from __future__ import annotations

import dataclasses
import json

from fitscale.checkpoint.layout import DCP_METADATA_FILE, write_metadata
from fitscale.cli import main
from fitscale.config import load_config
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
