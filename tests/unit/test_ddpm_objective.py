"""model.objective=ddpm wired through fitscale: the packed loss, config and sampler refusals,
guidance, batch-invariant ancestral sampling, validation, and a short train + `fitscale sample`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from fitscale.config import load_config
from fitscale.config.ddpm import DdpmConfig
from fitscale.config.errors import ConfigError
from fitscale.config.train import FlowConfig
from fitscale.data.batch import pack_images
from fitscale.errors import UserError
from fitscale.flow.ddpm import create_diffusion
from fitscale.flow.ddpm_loss import ddpm_loss, per_image_ddpm_noise
from fitscale.flow.guidance import PackedVelocity, guide
from fitscale.models import build_model
from fitscale.sample.generate import generate_latents, training_ddpm
from fitscale.sample.options import SamplingOptions, check_objective
from fitscale.sample.plan import SampleItem, pack_layout

DATA = ["data.path=/nonexistent", "data.num_classes=10", "model.overrides.num_classes=10"]
DDPM = ["model.overrides.objective=ddpm", "train.flow.timesteps=uniform"]


class FixedOutput(torch.nn.Module):
    """A deterministic function of x_t and the timestep index: eps values, then variance values."""

    def forward(self, x, t, y, pos, cu_seqlens, max_seqlen=None, sizes=None):
        t_tokens = torch.repeat_interleave(t, cu_seqlens[1:] - cu_seqlens[:-1], output_size=x.shape[0])[
            :, None
        ]
        return torch.cat([torch.tanh(0.5 * x + t_tokens / 1000), torch.sin(x + t_tokens / 300)], dim=-1)


def tiny_ddpm(seed: int = 0, learn_sigma: bool = True) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("tiny", attn_backend="reference", objective="ddpm", learn_sigma=learn_sigma)
    with torch.no_grad():
        for param in model.parameters():  # the released init zeroes the output layer
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def test_packed_loss_is_each_images_release_loss_averaged_and_ignores_padding():
    diffusion = create_diffusion(DdpmConfig(), learn_sigma=True)
    images = [torch.randn(4, 16), torch.randn(12, 16)]
    batch = pack_images(images, [(2, 2), (3, 4)], [1, 2], [7, 8], token_budget=20)  # 4 padding tokens
    t, noise = per_image_ddpm_noise(batch, seed=0, step=0, num_timesteps=1000)
    t[:2] = torch.tensor([0.0, 637.0])  # image 0 at t = 0: the decoder NLL
    out = ddpm_loss(FixedOutput(), batch, t, noise, 2, FlowConfig(), diffusion)
    expected = []
    for k, (image, start) in enumerate(zip(images, (0, 4))):
        n = image.shape[0]
        index = torch.full((n,), int(t[k]))
        x_t = diffusion.q_sample(image, index, noise[start : start + n])
        output = FixedOutput()(x_t, t[k : k + 1], None, None, torch.tensor([0, n]))
        terms = diffusion.training_losses(
            output, image, noise[start : start + n], index, lambda v: v.mean()[None], index[:1]
        )
        expected.append(terms)
    for name in ("mse", "vb"):
        torch.testing.assert_close(out.terms[name], torch.cat([e[name] for e in expected]))
    torch.testing.assert_close(out.per_image, torch.cat([e["loss"] for e in expected]))
    torch.testing.assert_close(out.loss, out.per_image.mean())
    torch.testing.assert_close(out.timesteps, torch.tensor([0.0, 0.637]))


def test_timestep_indices_and_noise_are_drawn_per_image_whatever_the_batch():
    a, b = torch.randn(4, 16), torch.randn(9, 16)
    together = pack_images([a, b], [(2, 2), (3, 3)], [0, 0], [1, 2])
    alone = pack_images([b], [(3, 3)], [0], [2])
    t1, n1 = per_image_ddpm_noise(together, 5, 3, 1000)
    t2, n2 = per_image_ddpm_noise(alone, 5, 3, 1000)
    assert torch.equal(t1[1], t2[0]) and torch.equal(n1[4:], n2)
    many = torch.cat([per_image_ddpm_noise(alone, 5, step, 10)[0] for step in range(200)])
    assert torch.equal(many, many.round()) and set(many.long().tolist()) == set(range(10))


def test_a_timestep_that_is_not_an_index_is_refused():
    batch = pack_images([torch.randn(4, 16)], [(2, 2)], [0], [1])
    diffusion = create_diffusion(DdpmConfig(), learn_sigma=True)
    with pytest.raises(
        ValueError, match=r"^ddpm loss: timesteps\[0\]=0.5 is not an integer index in \[0, 1000\)$"
    ):
        ddpm_loss(FixedOutput(), batch, torch.tensor([0.5]), torch.randn(4, 16), 1, FlowConfig(), diffusion)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (
            ["model.overrides.objective=ddpm"],
            "train.flow.timesteps=logit_normal with model.objective=ddpm: the release draws the timestep index "
            "uniformly in [0, train.ddpm.diffusion_steps); set train.flow.timesteps=uniform",
        ),
        (
            [*DDPM, "train.flow.time_shift=0.5"],
            "train.flow.time_shift=0.5 with model.objective=ddpm: the release does not shift DDPM timesteps; "
            "set train.flow.time_shift=1",
        ),
        (
            [
                *DDPM,
                "train.repa.encoder=vit_small",
                "train.repa.encoder_weights=/x.safetensors",
                "train.repa.block=1",
            ],
            "train.repa.encoder=vit_small with model.objective=ddpm: REPA is defined for flow models only; "
            "set train.repa.encoder=null",
        ),
        (
            [*DDPM, "train.sample_every=5"],
            "train.sample_sampler=heun is a flow sampler but model.objective=ddpm: set train.sample_sampler=ddpm "
            "(or train.sample_every=0)",
        ),
        (
            [*DDPM, "train.sample_every=5", "train.sample_sampler=ddpm", "train.sample_steps=1"],
            "train.sample_steps=1: the ddpm sampler takes 2 to train.ddpm.diffusion_steps=1000 steps",
        ),
        (
            ["train.sample_every=5", "train.sample_sampler=ddpm"],
            "train.sample_sampler=ddpm needs model.objective=ddpm (this is a flow model); choose an ODE sampler "
            "such as heun",
        ),
        (
            [*DDPM, "train.ddpm.noise_schedule=cosine"],
            "train.ddpm.noise_schedule: 'cosine' is not one of linear, squaredcos_cap_v2",
        ),
    ],
)
def test_config_refuses_what_the_release_does_not_define(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [*DATA, *overrides])
    assert str(info.value) == message


def test_ddpm_config_is_accepted_with_uniform_timesteps():
    config = load_config(None, [*DATA, *DDPM, "train.ddpm.use_kl=true", "train.sample_sampler=ddpm"])
    assert config.train.ddpm.use_kl and config.model_config().objective == "ddpm"


def test_sampler_of_the_other_family_is_refused_in_one_line():
    with pytest.raises(UserError) as info:
        check_objective("ddpm", SamplingOptions(sampler="heun"))
    assert str(info.value) == (
        "--sampler heun is a flow sampler, but this model has objective ddpm (it predicts noise at timestep "
        "indices): use --sampler ddpm"
    )
    with pytest.raises(UserError, match=r"^--mode sde is a flow sampler"):
        check_objective("ddpm", SamplingOptions(mode="sde"))
    with pytest.raises(UserError) as info:
        check_objective("flow", SamplingOptions(sampler="ddpm"))
    assert str(info.value) == (
        "--sampler ddpm needs a model with objective ddpm; this is a flow model: use an ODE sampler such as "
        "--sampler heun, or --mode sde"
    )


def test_ddpm_sampling_options():
    assert SamplingOptions(sampler="ddpm").steps == 250  # the release's --num-sampling-steps
    for kwargs, message in [
        ({"steps": 1}, "--steps 1: --sampler ddpm needs at least 2 steps"),
        ({"steps": 1001}, "--steps 1001: --sampler ddpm takes at most the model's 1000 diffusion steps"),
        ({"atol": 1e-3}, "--atol applies to samplers with an error control; --sampler ddpm takes --steps"),
        ({"time_shift": 0.5}, "--time-shift 0.5: --sampler ddpm samples the trained schedule; drop it"),
    ]:
        with pytest.raises(UserError) as info:
            SamplingOptions(sampler="ddpm", **kwargs)
        assert str(info.value) == message


def test_guidance_of_a_ddpm_model_is_the_releases_forward_with_cfg():
    """The first 3 p*p eps values guided, the rest (4th channel and every variance value) conditional."""
    model = tiny_ddpm()
    items = [SampleItem(0, 3, 2, 3), SampleItem(1, 5, 3, 2)]
    layout = pack_layout(items, torch.device("cpu"))
    x = torch.randn(12, 16)
    t = torch.tensor(637.0)
    guided = PackedVelocity(model, layout, cfg_scale=4.0, guidance_channels=3)(x, t)
    args = (layout.pos, layout.cu_seqlens)
    with torch.no_grad():
        cond = model(x, t.expand(2), layout.labels, *args, max_seqlen=6, sizes=layout.sizes)
        uncond = model(
            x,
            t.expand(2),
            torch.full((2,), model.config.num_classes),
            *args,
            max_seqlen=6,
            sizes=layout.sizes,
        )
    assert guided.shape == (12, 32)
    torch.testing.assert_close(guided[:, :12], uncond[:, :12] + 4.0 * (cond[:, :12] - uncond[:, :12]))
    torch.testing.assert_close(guided[:, 12:], cond[:, 12:])
    # --scale-pow reads the index as the release does (clamp_max(t, 1)): no guidance past index 0
    scheduled = PackedVelocity(model, layout, cfg_scale=4.0, guidance_channels=3, scale_pow=1.0)
    torch.testing.assert_close(scheduled(x, t), cond)


def test_release_guidance_of_a_one_channel_model_guides_every_value():
    cond, uncond = torch.ones(5, 4), torch.zeros(5, 4)  # p = 2, C = 1: 4 values per token
    # the release: C_cfg = 3 * p * p = 12; model_out[:, :12] is all 4 values
    assert torch.equal(guide(cond, uncond, 3.0, guidance_channels=3, patch_size=2), torch.full((5, 4), 3.0))
    with pytest.raises(UserError, match=r"^guidance_channels=0 must be >= 1"):
        guide(cond, uncond, 3.0, guidance_channels=0)


def test_guidance_of_a_one_channel_learn_sigma_model_reaches_into_the_variance_as_released():
    """C = 1, learn_sigma: 8 values per token (4 eps, 4 variance); the release's [:12] slice guides all 8."""
    torch.manual_seed(0)
    model = build_model("tiny", attn_backend="reference", objective="ddpm", learn_sigma=True, in_channels=1)
    model.eval()
    items = [SampleItem(0, 3, 2, 3), SampleItem(1, 5, 3, 2)]
    layout = pack_layout(items, torch.device("cpu"))
    x, t = torch.randn(12, 4), torch.tensor(400.0)
    guided = PackedVelocity(model, layout, cfg_scale=4.0, guidance_channels=3)(x, t)
    with torch.no_grad():
        doubled = layout.doubled(model.config.num_classes)
        out = model(torch.cat([x, x]), t.expand(4), doubled.labels, doubled.pos, doubled.cu_seqlens,
                    max_seqlen=doubled.max_seqlen, sizes=doubled.sizes)  # fmt: skip
    cond, uncond = out[:12], out[12:]
    assert guided.shape == (12, 8)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond))


def test_ancestral_sampling_is_bit_identical_alone_and_in_a_batch():
    model = tiny_ddpm()
    items = [SampleItem(0, 3, 2, 3, index_in_size=0), SampleItem(1, 5, 3, 3, index_in_size=0)]
    options = SamplingOptions(sampler="ddpm", steps=6, cfg_scale=3.0, guidance_channels=3)
    both = generate_latents(model, items, options)
    alone = generate_latents(model, items[1:], options)
    assert torch.equal(both[1], alone[0]) and torch.isfinite(both[0]).all()
    packed = generate_latents(model, items, SamplingOptions(sampler="ddpm", steps=6, batch_invariant=False))
    assert packed[1].shape == (4, 6, 6) and not torch.equal(packed[1], alone[0])  # other guidance


def test_validation_of_a_ddpm_model_scores_a_fixed_grid_of_indices():
    from fitscale.train.validation import ValidationSettings, evaluate_validation_loss

    model = tiny_ddpm(learn_sigma=False)
    batch = pack_images([torch.randn(4, 16), torch.randn(6, 16)], [(2, 2), (2, 3)], [1, 2], [0, 1])
    settings = ValidationSettings(ddpm=DdpmConfig(diffusion_steps=100, sigma_small=True))
    first = evaluate_validation_loss(model, [batch], settings)
    assert sorted(k for k in first if k.startswith("val_loss_i")) == sorted(
        f"val_loss_i{i}" for i in (6, 18, 31, 43, 56, 68, 81, 93)
    )
    assert first == evaluate_validation_loss(model, [batch], settings)
    assert np.isfinite(first["val_loss"])


@pytest.mark.slow
def test_train_ten_steps_then_sample_with_the_ddpm_sampler(tmp_path, capsys):
    """tiny objective=ddpm learn_sigma trained 10 steps (1 process), its previews, then `fitscale sample`."""
    from helpers.train_runs import metric_records, write_digits_split

    from fitscale.cli import main
    from fitscale.train.trainer import Trainer

    digits = write_digits_split(tmp_path / "digits", images=24)
    overrides = [
        f"data.path={digits}",
        f"data.val_path={digits}",
        "train.val_every=10",
        f"train.run_dir={tmp_path / 'run'}",
        "train.steps=10",
        "parallel.sharding=none",
        "checkpoint.interval=0",
        "model.overrides.hidden_size=64",
        "model.overrides.learn_sigma=true",
        "train.sample_every=10",
        "train.sample_sampler=ddpm",
        "train.sample_steps=4",
        "train.ddpm.diffusion_steps=100",
        *DDPM,
    ]
    Trainer(load_config("recipes/demo.yaml", overrides)).train()
    steps = list(metric_records(tmp_path / "run").values())
    assert len(steps) == 10 and all(np.isfinite([r["loss"], r["mse"], r["vb"]]).all() for r in steps)
    assert np.isfinite(steps[-1]["val_loss_i93"]) and "val_loss_t0.062" not in steps[-1]
    assert all(abs(r["loss"] - r["mse"] - r["vb"]) < 1e-5 * abs(r["loss"]) for r in steps)
    assert (tmp_path / "run" / "samples" / "step-10.png").is_file()
    out = tmp_path / "samples"
    flags = ["--height", "64", "--width", "64", "--num-per-size", "2", "--device", "cpu", "--cfg", "2"]
    assert (
        main(
            ["sample", str(tmp_path / "run"), "--out", str(out), "--sampler", "ddpm", "--steps", "5", *flags]
        )
        == 0
    )
    latents = sorted((out / "latents").glob("*.npy"))
    assert len(latents) == 2 and all(np.isfinite(np.load(p)).all() for p in latents)
    assert json.loads((out / "sampling.json").read_text())["options"]["ddpm"]["diffusion_steps"] == 100
    capsys.readouterr()
    assert (
        main(["sample", str(tmp_path / "run"), "--out", str(tmp_path / "heun"), "--sampler", "heun", *flags])
        == 2
    )
    assert capsys.readouterr().err.strip().endswith("use --sampler ddpm")
    assert not (tmp_path / "heun").exists()  # refused before anything is written


def test_a_checkpoint_is_sampled_with_the_diffusion_it_was_saved_with(tmp_path):
    run = tmp_path / "run"
    step = run / "checkpoints" / "step-3"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    saved = {"noise_schedule": "linear", "diffusion_steps": 1000, "sigma_small": False,
             "predict_xstart": False, "use_kl": False, "rescale_learned_sigmas": False}  # fmt: skip
    (step / "fitscale.json").write_text(json.dumps({"step": 3, "config": {"train": {"ddpm": saved}}}))
    resumed = dict(saved, noise_schedule="squaredcos_cap_v2", predict_xstart=True)  # a later resume
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"ddpm": resumed}}))
    ddpm = training_ddpm(step)
    assert (ddpm.noise_schedule, ddpm.predict_xstart) == ("linear", False)


@pytest.fixture
def ddpm_file_flags(tmp_path) -> list[str]:
    """`fitscale sample` flags of a tiny objective=ddpm weights file (fixed variances), one 32x32 size."""
    from safetensors.torch import save_file

    weights = tmp_path / "ddpm.safetensors"
    save_file(tiny_ddpm(learn_sigma=False).state_dict(), str(weights))
    return [str(weights), "--model", "tiny", "--set", "objective=ddpm", "--height", "32", "--width", "32"]


def test_the_advice_for_a_flow_sampler_on_a_ddpm_model_is_not_circular(tmp_path, capsys, ddpm_file_flags):
    """`--mode sde` says to drop it; following that half-way (`--mode sde --sampler ddpm`) says the same."""
    from fitscale.cli import main

    flags = ddpm_file_flags
    assert main(["sample", *flags, "--out", str(tmp_path / "a"), "--device", "cpu", "--mode", "sde"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "--mode sde is a flow sampler, but this model has objective ddpm (it predicts noise at timestep "
            "indices): drop --mode sde and use --sampler ddpm"
        )
    )
    assert main(["sample", *flags, "--out", str(tmp_path / "b"), "--mode", "sde", "--sampler", "ddpm"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--sampler applies to --mode ode only; drop it or add --mode ode (this run is --mode sde)")
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_scale_pow_with_the_ddpm_sampler_warns_once(tmp_path, capsys, ddpm_file_flags):
    """The release reads scale_pow on the clamped timestep index: guidance off at every step but the last."""
    from fitscale.cli import main
    from fitscale.sample.cli import warn_scale_pow

    flags = [*ddpm_file_flags, "--sampler", "ddpm", "--steps", "2", "--cfg", "2", "--device", "cpu"]
    assert main(["sample", *flags, "--out", str(tmp_path / "pow"), "--scale-pow", "1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "--scale-pow" in line]
    assert warnings == [
        "warning: --scale-pow 1.0 with --sampler ddpm reads the timestep index as the release does (clamped at "
        "1), so guidance is off at every step but the last; drop --scale-pow to guide every step (docs/sampling.md)"
    ]
    warn_scale_pow(SamplingOptions(sampler="ddpm", cfg_scale=2.0))  # no --scale-pow: nothing to say
    assert capsys.readouterr().err == ""
