"""The rules of `fitscale.train.resume` on written run folders (no training): which config the
check compares with, and fields whose rule depends on the rest of the config."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from fitscale.config import ConfigError, load_config, to_yaml
from fitscale.train.resume import check_before_start

BASE = ["data.path=/data/digits", "data.num_classes=10", "model.name=tiny", "train.device=cpu"]


def write_run(tmp_path, overrides: list[str], record_config: bool) -> list[str]:
    """A run folder with one complete checkpoint (step 3) whose metadata may or may not hold the config."""
    run = [f"train.run_dir={tmp_path}", *BASE, *overrides]
    config = load_config(None, run)
    step = tmp_path / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (step / ".metadata").write_text("")
    metadata = {
        "format": 1,
        "step": 3,
        "world_size": 1,
        **({"config": asdict(config)} if record_config else {}),
    }
    (step / "fitscale.json").write_text(json.dumps(metadata))
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    return run


def test_a_checkpoint_without_its_config_is_checked_against_the_run_folders_config(tmp_path):
    run = write_run(tmp_path, ["train.seed=4"], record_config=False)
    with pytest.raises(ConfigError, match=r"train.seed was 4 and is now 5 \(every step's noise"):
        check_before_start(load_config(None, [*run, "train.seed=5"]))
    assert [str(c) for c in check_before_start(load_config(None, [*run, "optim.lr=3e-4"]))] == [
        "optim.lr 0.0001 -> 0.0003"
    ]


def test_the_zero_stage_is_fixed_only_under_deepspeed(tmp_path):
    fsdp = write_run(tmp_path / "fsdp", [], record_config=True)
    assert [str(c) for c in check_before_start(load_config(None, [*fsdp, "parallel.zero_stage=2"]))] == [
        "parallel.zero_stage 3 -> 2"
    ]
    deepspeed = write_run(tmp_path / "ds", ["parallel.backend=deepspeed", "optim.ema.enabled=false"], True)
    with pytest.raises(ConfigError, match="parallel.zero_stage was 3 and is now 2 .DeepSpeed lays out"):
        check_before_start(load_config(None, [*deepspeed, "parallel.zero_stage=2"]))


def test_restating_a_model_default_is_no_change_and_a_fresh_run_is_not_checked(tmp_path):
    run = write_run(tmp_path / "run", [], record_config=True)
    assert check_before_start(load_config(None, [*run, "model.overrides.depth=2"])) == []
    fresh = [f"train.run_dir={tmp_path / 'fresh'}", *BASE, "train.seed=9"]
    assert check_before_start(load_config(None, fresh)) == []


def test_a_ddpm_resume_refuses_what_the_network_predicts_and_allows_loss_weights(tmp_path):
    ddpm = ["model.overrides.objective=ddpm", "train.flow.timesteps=uniform"]
    run = write_run(tmp_path / "ddpm", ddpm, record_config=True)
    for change, message in [
        ("noise_schedule=squaredcos_cap_v2", "noise_schedule was 'linear' and is now 'squaredcos_cap_v2'"),
        (
            "diffusion_steps=500",
            "diffusion_steps was 1000 and is now 500 .the network reads timestep indices",
        ),
        ("predict_xstart=true", "predict_xstart was False and is now True .it decides whether the network"),
    ]:
        with pytest.raises(ConfigError, match=f"cannot resume .*train.ddpm.{message}"):
            check_before_start(load_config(None, [*run, f"train.ddpm.{change}"]))
    loss_only = [
        "train.ddpm.use_kl=true",
        "train.ddpm.rescale_learned_sigmas=true",
        "train.ddpm.sigma_small=true",
    ]
    assert len(check_before_start(load_config(None, [*run, *loss_only]))) == 3
    flow = write_run(tmp_path / "flow", [], record_config=True)  # a flow model ignores train.ddpm
    assert [
        str(c) for c in check_before_start(load_config(None, [*flow, "train.ddpm.predict_xstart=true"]))
    ] == ["train.ddpm.predict_xstart False -> True"]
