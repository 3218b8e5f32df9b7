"""The paper's recipes: they load, state their cost right, and high-res post-training trains exactly
the released set while every other weight stays bit-identical."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fitscale.config import load_config
from fitscale.models import build_model
from fitscale.models.flops import training_flops
from fitscale.models.partial import apply_trainable

RECIPES = [
    "fitv2_b_256",
    "fitv2_xl_256",
    "fitv2_3b_256",
    "fitv2_xl_hr512",
    "fitv2_3b_hr512",
    "fitv2_xl_256_repa",
]
H100_PEAK = 989e12


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_states_its_cost(name):
    path = Path("recipes") / f"{name}.yaml"
    config = load_config(path)
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    # The paper's settings.
    assert (config.optim.lr, config.optim.beta1, config.optim.beta2, config.optim.weight_decay) == (
        1e-4,
        0.9,
        0.999,
        0,
    )
    assert config.optim.ema.decay == 0.9999 and config.optim.ema.warmup == "none"  # the release's EMA
    assert config.train.grad_clip == 1.0
    assert config.optim.schedule.name == "constant" and config.train.flow.timesteps == "logit_normal"
    assert config.data.global_batch_size == 256 and config.parallel.param_dtype == "bf16"
    assert config.model_config().class_dropout_prob == 0.1
    expected_steps = {
        "fitv2_b_256": 400_000,
        "fitv2_xl_256": 2_000_000,
        "fitv2_3b_256": 1_000_000,
        "fitv2_xl_hr512": 400_000,
        "fitv2_3b_hr512": 200_000,
        "fitv2_xl_256_repa": 1_000_000,
    }[name]
    assert config.train.steps == expected_steps
    # The header's FLOPs and H100-hours are the model's own count at the stated MFU.
    tokens = config.data.max_image_tokens
    flops = training_flops(config.model_config(), [tokens] * 256) * config.train.steps
    stated = re.search(r"Cost: ([0-9.]+e\+?\d+) training FLOPs", header)
    hours = re.search(r"= ([0-9,]+) H100-hours at (\d+)% MFU", header)
    assert stated and hours, f"{path}: the header must state its training FLOPs and H100-hours"
    assert float(stated.group(1)) == pytest.approx(flops, rel=0.01)
    mfu = int(hours.group(2)) / 100
    assert int(hours.group(1).replace(",", "")) == round(flops / (mfu * H100_PEAK) / 3600)
    # Ranks divide the batch, and the per-rank share fits the micro-batches.
    ranks = config.launch.nodes * config.launch.gpus_per_node
    assert 256 % ranks == 0


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_dry_runs_on_deepspeed_with_hybrid_sharding_as_zero_plus_plus_hpz(name, tmp_path, capsys):
    """`fitscale launch RECIPE --set parallel.backend=deepspeed --dry-run` passes its checks; the
    recipe's HSDP (shard within each node of 8) becomes ZeRO-3 with an hpZ group of one node."""
    from fitscale.cli import main
    from fitscale.parallel.deepspeed import deepspeed_config
    from fitscale.parallel.mesh import DistributedEnv

    run_dir = tmp_path / "run"
    argv = [
        "launch",
        f"recipes/{name}.yaml",
        "--set",
        "parallel.backend=deepspeed",
        f"train.run_dir={run_dir}",
    ]
    assert main([*argv, "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["problems"] == [] and "backend: deepspeed" in plan["config"]
    config = load_config(Path("recipes") / f"{name}.yaml", ["parallel.backend=deepspeed"])
    nodes, per_node = config.launch.nodes, config.launch.gpus_per_node
    env = DistributedEnv(0, nodes * per_node, 0, per_node, torch.device("cuda", 0))
    zero = deepspeed_config(config.parallel, config.train, env)["zero_optimization"]
    hybrid = config.parallel.sharding == "hybrid"
    assert zero == ({"stage": 3, "zero_hpz_partition_size": 8} if hybrid else {"stage": 3}), (nodes, per_node)
    assert config.parallel.compile and not run_dir.exists()


def test_hybrid_sharding_on_zero2_is_refused_naming_the_fix():
    from fitscale.config.errors import ConfigError

    overrides = ["parallel.backend=deepspeed", "parallel.zero_stage=2"]
    with pytest.raises(ConfigError) as error:
        load_config("recipes/fitv2_3b_256.yaml", overrides)
    assert str(error.value) == (
        "parallel.sharding=hybrid with parallel.backend=deepspeed is ZeRO++'s hierarchical partitioning "
        "(hpZ), a ZeRO-3 feature; parallel.zero_stage=2: set parallel.zero_stage=3 or parallel.sharding=full"
    )


@pytest.mark.parametrize(("preset", "trainable", "total"), [("fitv2-xl-hr", 94_961_680, 671_045_776)])
def test_high_res_recipe_selects_the_released_trainable_set(preset, trainable, total):
    config = load_config("recipes/fitv2_xl_hr512.yaml")
    assert config.model.name == preset and config.data.max_image_tokens == 1024
    model_config = config.model_config()
    assert (model_config.rope_method, model_config.rope_decoupled, model_config.rope_per_image) == (
        "ntk",
        True,
        True,
    )
    with torch.device("meta"):
        model = build_model(config.model.name)
    assert sum(p.numel() for p in model.parameters()) == total
    assert apply_trainable(model, config.train.trainable[0]) == trainable


def test_high_res_post_training_changes_only_the_trainable_set(tmp_path):
    """Two optimizer steps of the hr recipe on a depth-reduced model, started from a weights file."""
    from safetensors.torch import save_file

    from fitscale.data.sources import build_digits
    from fitscale.data.writer import WriteSettings, write_dataset
    from fitscale.models.partial import matches, resolve_patterns
    from fitscale.train.trainer import Trainer

    data = tmp_path / "digits"
    build, _ = build_digits(seed=0, dtype="float32")
    write_dataset(
        data,
        [(d, 0) for d in range(16)],
        build,
        WriteSettings(writer="digits", num_classes=10, options={"dtype": "float32"}),
        progress=False,
    )
    small = dict(
        depth=2, hidden_size=64, num_heads=4, adaln_lora_rank=16, num_classes=10, attn_backend="reference"
    )
    torch.manual_seed(0)
    start = build_model("fitv2-xl-hr", **small)
    with torch.no_grad():  # non-zero everywhere, so every trainable weight gets a gradient
        for param in start.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    save_file(start.state_dict(), str(tmp_path / "start.safetensors"))
    overrides = [f"model.overrides.{k}={v}" for k, v in small.items()] + [
        f"data.path={data}",
        "data.val_path=null",
        "train.val_every=0",
        "data.num_classes=10",
        "data.global_batch_size=4",
        "data.token_budget=1024",
        "data.pad_to_budget=false",
        "data.pin_memory=false",
        "data.num_workers=0",
        f"train.run_dir={tmp_path / 'run'}",
        "train.steps=2",
        "train.device=cpu",
        f"train.init_from={tmp_path / 'start.safetensors'}",
        "optim.lr=1e-2",
        "parallel.sharding=none",
        "parallel.compile=false",
        "parallel.activation_checkpointing='off'",
        "parallel.param_dtype=fp32",
        "checkpoint.interval=0",
        "checkpoint.async_save=false",
        "log.wandb=disabled",
        "launch.cluster=local",
    ]
    config = load_config("recipes/fitv2_xl_hr512.yaml", overrides)
    trainer = Trainer(config)
    assert trainer.train() == 2
    patterns = resolve_patterns("high-res")
    after = trainer.model.state_dict()
    changed = {name for name, value in start.state_dict().items() if not torch.equal(after[name], value)}
    expected = {name for name, _ in start.named_parameters() if matches(name, patterns)}
    assert changed == expected


def test_repa_recipe_is_the_xl_recipe_with_repas_published_dinov2_b_settings():
    repa, plain = load_config("recipes/fitv2_xl_256_repa.yaml"), load_config("recipes/fitv2_xl_256.yaml")
    settings = repa.train.repa
    assert (settings.encoder, settings.weight, settings.projector_width, settings.projector_depth) == (
        "vit_base_patch14_dinov2",
        0.5,
        2048,
        3,
    )
    assert settings.block == round(8 / 28 * repa.model_config().depth) == 10  # REPA's 8 of 28, of 36
    for section in ("model", "data", "optim", "parallel"):
        assert getattr(repa, section) == getattr(plain, section), section
