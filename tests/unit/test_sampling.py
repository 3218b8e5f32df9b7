"""`fitscale sample`: packing many sizes, per-image noise, weights from runs and files, outputs, FID."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers.tiny_models import tiny_model

from fitscale.cli import main
from fitscale.models import build_model
from fitscale.sample.generate import generate_latents, load_sampling_model
from fitscale.sample.options import SamplingOptions, extrapolation_overrides
from fitscale.sample.plan import plan_items


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(tiny_model().state_dict(), str(path))
    return path


# Every sampler, with settings that keep it fast on a tiny model.
SAMPLERS = {
    "euler": dict(sampler="euler", steps=2),
    "heun": dict(sampler="heun", steps=2),
    "midpoint": dict(sampler="midpoint", steps=2),
    "rk4": dict(sampler="rk4", steps=1),
    "heun2": dict(sampler="heun2", steps=1),
    "heun3": dict(sampler="heun3", steps=1),
    "implicit_adams": dict(sampler="implicit_adams", steps=2, atol=1e-4, rtol=1e-3),
    "dopri5": dict(sampler="dopri5", atol=1e-3, rtol=1e-2),
    "dopri8": dict(sampler="dopri8", atol=1e-2, rtol=1e-1),
    "bosh3": dict(sampler="bosh3", atol=1e-3, rtol=1e-2),
    "fehlberg2": dict(sampler="fehlberg2", atol=1e-3, rtol=1e-2),
    "adaptive_heun": dict(sampler="adaptive_heun", atol=1e-3, rtol=1e-2),
    "sde-euler": dict(mode="sde", steps=3, diffusion_form="SBDM"),
    "sde-heun": dict(mode="sde", sde_sampler="heun", steps=2, last_step="tweedie"),
}


def assert_same_images(first: list[torch.Tensor], second: list[torch.Tensor], tolerance: float, what: str):
    """Each pair equal to `tolerance` relative to the image's largest value."""
    for image, (a, b) in enumerate(zip(first, second)):
        error = ((a - b).abs().max() / a.abs().max()).item()
        assert error < tolerance, f"{what}: image {image} differs by {error:.1e} (relative)"


@pytest.fixture
def one_thread():
    """Tiny matrices: more threads only wait on each other on a busy machine (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def float64_model():
    """The model's fp32 arithmetic differs by ~1e-7 between batch shapes, and dopri8's tableau or
    SBDM's 1/t amplify that up to 1e-4; in float64 nothing but a batch effect can move an image."""
    return tiny_model().double()


@pytest.mark.numeric
@pytest.mark.parametrize("name", SAMPLERS)
def test_each_image_is_bit_identical_alone_and_in_any_batch(name, one_thread):
    """The default (batch-invariant) sampling in fp32: an image drawn alone, beside other sizes, in
    another order, or beside itself is the same bit for bit, guided or not. (Packed forwards move an
    fp32 image by ~1e-7 per evaluation, and adaptive solvers carry it up to their tolerance.)"""
    model = tiny_model()
    items = plan_items([(32, 48), (48, 32), (32, 32)], 1, num_classes=10, seed=3)
    for guidance in (dict(), dict(cfg_scale=2.5, scale_pow=1.0, guidance_channels=3)):
        options = SamplingOptions(**SAMPLERS[name], **guidance, seed=5)
        together = generate_latents(model, items, options)
        reversed_ = generate_latents(model, items[::-1], options)[::-1]
        alone = [generate_latents(model, [item], options)[0] for item in items]
        for image, latent in enumerate(together):
            assert torch.isfinite(latent).all()
            assert torch.equal(latent, alone[image]), f"{name} {guidance}: image {image} alone vs together"
            assert torch.equal(latent, reversed_[image]), f"{name} {guidance}: image {image} reversed"


@pytest.mark.numeric
@pytest.mark.parametrize("name", SAMPLERS)
def test_packed_sampling_controls_each_images_steps_alone(name, float64_model, one_thread):
    """`batch_invariant=False` packs images into shared forwards; an adaptive solver still controls
    each image's steps alone (fitscale.flow.per_image). In float64 the forward's batch effect is
    ~1e-16 per op (measured up to 1.7e-10 at the end, under default, avx2 and avx512 kernels), so only
    a batch-wide step control could move an image past 1e-8 (it moved ~1e-3)."""
    items = plan_items([(32, 48), (48, 32), (32, 32)], 1, num_classes=10, seed=3)
    for guidance in (dict(), dict(cfg_scale=2.5, scale_pow=1.0, guidance_channels=3)):
        options = SamplingOptions(**SAMPLERS[name], **guidance, seed=5, batch_invariant=False)
        together = generate_latents(float64_model, items, options)
        # Reversed, and a budget that fits one image (guided: its two copies) per forward.
        budget = 6 * (2 if options.cfg_scale != 1.0 else 1)
        alone = generate_latents(float64_model, items[::-1], replace(options, token_budget=budget))[::-1]
        for latent, item in zip(together, items):
            assert latent.shape == (4, 2 * item.rows, 2 * item.cols) and torch.isfinite(latent).all()
        assert_same_images(together, alone, 1e-8, f"{name} {guidance}: together vs alone, reversed")


def test_batch_invariant_sampling_ignores_the_token_budget(one_thread):
    """Each image is one forward when sampled alone, so `--token-budget` (packed batches only) does
    not apply: a guided image over the budget is sampled (it was refused with "raise the budget"),
    bit for bit as with a budget that fits it; packed sampling still refuses it."""
    model = tiny_model()
    items = plan_items([(32, 48)], 1, num_classes=10, seed=3)  # 6 tokens, 12 per guided forward
    options = SamplingOptions(**SAMPLERS["euler"], cfg_scale=2.5, seed=5, token_budget=8)
    small = generate_latents(model, items, options)
    large = generate_latents(model, items, replace(options, token_budget=12))
    assert torch.equal(small[0], large[0])
    with pytest.raises(ValueError, match="needs 12 tokens per forward, over --token-budget 8"):
        generate_latents(model, items, replace(options, batch_invariant=False))


def test_plan_items_checks_sizes_and_labels():
    items = plan_items([(256, 512)], 3, num_classes=1000, labels=[1, 2])
    assert [(i.index, i.label, i.rows, i.cols) for i in items] == [
        (0, 1, 16, 32),
        (1, 2, 16, 32),
        (2, 1, 16, 32),
    ]
    with pytest.raises(ValueError, match="size 250x256: height and width must be positive multiples of 16"):
        plan_items([(250, 256)], 1, 1000)
    with pytest.raises(ValueError, match=r"class 10 is outside \[0, 10\)"):
        plan_items([(64, 64)], 1, 10, labels=[10])


def test_extrapolation_flags_map_onto_model_fields():
    assert extrapolation_overrides(None) == {}
    vision = extrapolation_overrides("vision-yarn", attn_scale=True)
    assert vision == {
        "rope_method": "yarn",
        "rope_decoupled": True,
        "rope_attn_scale": True,
        "rope_per_image": True,
        "rope_target_grid": None,
    }
    model = build_model("tiny", **extrapolation_overrides("vision-ntk"))
    assert model.config.rope_method == "ntk" and model.config.rope_decoupled and model.config.rope_per_image
    with pytest.raises(ValueError, match="--extrapolation 'ntk2'"):
        extrapolation_overrides("ntk2")


def test_sample_command_writes_pngs_grid_npz_and_latents(weights_file, tmp_path, capsys):
    out = tmp_path / "samples"
    options = (
        "--model tiny --set attn_backend=reference --height 64 --width 64 --height 48 --width 112 "
        "--num-per-size 2 --labels 3,5 --cfg 1.5 --guide-first-3 --steps 2 --sampler heun "
        "--extrapolation vision-ntk --attn-scale --preview-channel 0 --json --device cpu"
    )
    argv = ["sample", str(weights_file), "--out", str(out), *options.split()]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 4 and summary["sizes"] == ["64x64", "48x112"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "000000_class3_64x64.png",
        "000001_class5_64x64.png",
        "000002_class3_48x112.png",
        "000003_class5_48x112.png",
    ]
    assert np.load(out / "latents" / "000002.npy").shape == (4, 6, 14)
    batch = np.load(out / "samples_6x14.npz")  # preview pictures are latent-sized
    assert batch["arr_0"].shape == (2, 6, 14, 3) and batch["arr_0"].dtype == np.uint8
    assert batch["arr_1"].tolist() == [3, 5]
    assert (out / "grid.png").is_file()
    index = json.loads((out / "samples.json").read_text())
    assert index["options"]["guidance_channels"] == 3 and len(index["images"]) == 4
    # A second run into the same folder is refused: nothing written is overwritten.
    assert main(argv) == 2
    assert "already holds samples" in capsys.readouterr().err


def test_an_interrupted_sampling_run_resumes_with_its_finished_images(weights_file, tmp_path, capsys):
    """A run stopped before its end (no samples.json) keeps its written pictures: a rerun samples only
    the missing ones (bit-identical to an uninterrupted run); other settings into that folder are refused."""
    out = tmp_path / "samples"
    options = (
        "--model tiny --set attn_backend=reference --height 32 --width 32 --num-per-size 3 --steps 2 "
        "--sampler heun --preview-channel 0 --device cpu"
    ).split()
    argv = ["sample", str(weights_file), "--out", str(out), *options]
    assert main(argv) == 0
    whole = {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}
    second = sorted((out / "images").iterdir())[1]
    (out / "samples.json").unlink()  # as if stopped before the end, without its second picture
    second.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # finished pictures were not sampled again
    assert {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())} == whole
    (out / "samples.json").unlink()
    capsys.readouterr()
    assert main([*argv, "--cfg", "2"]) == 2
    assert "holds pictures of another sampling run (options differs)" in capsys.readouterr().err
    assert main([*argv, "--raw"]) == 2  # other weights
    assert "(weights differs)" in capsys.readouterr().err
    assert main([*argv, "--cfg", "2", "--overwrite"]) == 0  # every image sampled again


def test_bad_sample_arguments_are_one_line_errors(weights_file, tmp_path, capsys):
    base = ["sample", str(weights_file), "--out", str(tmp_path / "o")]
    assert main([*base, "--height", "64"]) == 2
    assert "give one --width per --height" in capsys.readouterr().err
    assert main([*base, *"--height 64 --width 64 --model tiny --fid-reference x.npz".split()]) == 2
    assert "sampling no longer evaluates; sample, then run `fitscale eval" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("kept")
    assert (
        main(
            ["sample", str(weights_file), "--out", str(afile), *"--height 64 --width 64 --model tiny".split()]
        )
        == 2
    )
    assert capsys.readouterr().err.strip() == (
        f"fitscale sample: error: --out {afile} is a file; samples are written into a folder: pick another --out"
    )
    assert afile.read_text() == "kept"
    recipe = tmp_path / "recipe.yaml"  # a recipe given where a checkpoint belongs
    recipe.write_text("model: {name: tiny}\n")
    assert main(["sample", str(recipe), "--out", str(tmp_path / "r"), *"--height 64 --width 64".split()]) == 2
    assert capsys.readouterr().err.strip() == (
        f"fitscale sample: error: {recipe} is not a weights file that can be read without running its code "
        "(UnpicklingError); give a run folder, a step-N checkpoint folder, or a .safetensors / .pt / .bin of "
        "tensors (re-save a trusted one with torch.save(state_dict))"
    )


def test_sampling_options_take_each_modes_defaults_and_the_releases_names():
    assert SamplingOptions() == SamplingOptions(sampler="euler", steps=50)
    adaptive = SamplingOptions(sampler="dopri5")
    assert (adaptive.steps, adaptive.atol, adaptive.rtol) == (None, 1e-6, 1e-3)
    sde = SamplingOptions(mode="SDE", sde_sampler="Heun", diffusion_form="SBDM", last_step="Tweedie")
    assert (sde.mode, sde.sde_sampler, sde.diffusion_form, sde.last_step) == (
        "sde",
        "heun",
        "sbdm",
        "tweedie",
    )
    assert (sde.steps, sde.diffusion_norm, sde.last_step_size, sde.sampler, sde.atol) == (
        50,
        1.0,
        0.04,
        None,
        None,
    )
    assert SamplingOptions(mode="sde", last_step="None").last_step_size == 0.0
    assert SamplingOptions(**vars(sde)) == sde  # what samples.json records builds the same options


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            dict(sampler="rk5"),
            "--sampler 'rk5': choose one of euler, heun, midpoint, rk4, heun2, heun3, implicit_adams, dopri5, "
            "dopri8, bosh3, fehlberg2, adaptive_heun, ddpm",
        ),
        (dict(mode="sdes"), "--mode 'sdes': choose one of ode, sde"),
        (dict(sampler="dopri5", atol=-1e-6), "--atol -1e-06: a tolerance must be > 0"),
        (dict(sampler="bosh3", rtol=0.0), "--rtol 0.0: a tolerance must be > 0"),
        (
            dict(diffusion_form="sigma"),
            "--diffusion-form applies to --mode sde only; drop it or add --mode sde (this run is --mode ode)",
        ),
        (
            dict(mode="sde", sampler="dopri5"),
            "--sampler applies to --mode ode only; drop it or add --mode ode (this run is --mode sde)",
        ),
        (
            dict(mode="sde", atol=1e-3),
            "--atol applies to --mode ode only; drop it or add --mode ode (this run is --mode sde)",
        ),
        (
            dict(sampler="dopri5", steps=10),
            "--steps applies to grid samplers (euler, heun, midpoint, rk4, heun2, heun3, implicit_adams); "
            "--sampler dopri5 picks its own steps from --atol / --rtol",
        ),
        (
            dict(sampler="rk4", rtol=1e-3),
            "--rtol applies to samplers with an error control (dopri5, dopri8, bosh3, fehlberg2, adaptive_heun, "
            "implicit_adams); --sampler rk4 takes --steps",
        ),
        (
            dict(mode="sde", diffusion_form="cosine"),
            "--diffusion-form 'cosine': choose one of constant, sbdm, sigma, linear, decreasing, "
            "increasing-decreasing",
        ),
        (dict(mode="sde", sde_sampler="rk4"), "--sde-sampler 'rk4': choose one of euler, heun"),
        (dict(mode="sde", last_step="last"), "--last-step 'last': choose one of mean, tweedie, euler, none"),
        (
            dict(mode="sde", last_step_size=1.0),
            "--last-step-size 1.0: must be in (0, 1) (or --last-step none to run the SDE to t = 1)",
        ),
        (
            dict(mode="sde", last_step="none", last_step_size=0.1),
            "--last-step-size applies to --last-step mean, tweedie or euler; drop it",
        ),
        (
            dict(mode="sde", sde_sampler="heun", last_step="none"),
            "--last-step none with --sde-sampler heun evaluates the score at t = 1, where it is infinite "
            "(the release returns NaN); choose --last-step mean, tweedie or euler",
        ),
        (dict(mode="sde", diffusion_norm=-1.0), "--diffusion-norm -1.0: must be >= 0"),
        (dict(scale_pow=-1.0), "--scale-pow -1.0: must be >= 0 (0 = a constant guidance scale)"),
    ],
)
def test_bad_sampling_options_name_the_flag_and_the_choices(fields, message):
    with pytest.raises(ValueError) as error:
        SamplingOptions(**fields)
    assert str(error.value) == message


def test_bad_sampler_flags_stop_the_command_before_anything_is_written(weights_file, tmp_path, capsys):
    out = tmp_path / "o"
    base = [
        "sample",
        str(weights_file),
        "--out",
        str(out),
        "--model",
        "tiny",
        "--height",
        "32",
        "--width",
        "32",
    ]
    assert main([*base, "--diffusion-form", "SBDM"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "--diffusion-form applies to --mode sde only; drop it or add --mode sde (this run is --mode ode)"
        )
    )
    assert main([*base, "--sampler", "dopri5", "--atol", "-1"]) == 2
    assert "--atol -1.0: a tolerance must be > 0" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torchdiffeq", None)  # as if not installed
        assert main([*base, "--sampler", "rk4"]) == 2
    assert "--sampler rk4: the torchdiffeq samplers need torchdiffeq: pip install 'fitscale[sample]'" in (
        capsys.readouterr().err
    )
    assert not out.exists()


@pytest.mark.slow  # two sampling ranks
def test_two_ranks_write_the_images_one_rank_writes(weights_file, tmp_path, capsys):
    """`fitscale sample` on 2 gloo ranks (launched as `--nproc 2` launches them): each rank samples
    every other image, each alone (batch-invariant), so every latent is the one a single process
    writes, bit for bit; a noise stream tied to the rank or the batch would move an image by O(1)."""
    from fitscale.runtime.local import launch_local, python_module_command

    flags = (
        "--model tiny --set attn_backend=reference --height 32 --width 48 --height 48 --width 32 --num-per-size 2 "
        "--labels 3,7 --cfg 2 --scale-pow 1 --guide-first-3 --mode sde --sde-sampler Heun --steps 2 "
        "--diffusion-form Decreasing --last-step Euler --seed 4 --device cpu"
    ).split()
    assert main(["sample", str(weights_file), "--out", str(tmp_path / "one"), *flags]) == 0
    capsys.readouterr()
    command = python_module_command(
        "fitscale.cli", "sample", str(weights_file), "--out", str(tmp_path / "two")
    )
    assert launch_local([*command, *flags], 2, env={"OMP_NUM_THREADS": "1"}) == 0
    index = json.loads((tmp_path / "two" / "samples.json").read_text())
    assert index["options"]["sde_sampler"] == "heun" and index["options"]["diffusion_form"] == "decreasing"
    for image in range(4):
        one = np.load(tmp_path / "one" / "latents" / f"{image:06d}.npy")
        two = np.load(tmp_path / "two" / "latents" / f"{image:06d}.npy")
        assert np.array_equal(one, two), f"image {image}: {np.abs(one - two).max():.1e} apart"


def test_an_images_noise_and_label_depend_only_on_seed_size_and_index_within_size(
    weights_file, tmp_path, capsys
):
    """The 32x48 images of a run (random labels, SDE steps so every noise stream is used) are the same
    bit for bit, with the same labels, whether 32x48 is sampled alone, listed first, or listed after
    another size: their noise and labels are keyed by (seed, size, index within the size), not by
    the global index (which shifted them by the images listed before)."""
    flags = "--model tiny --set attn_backend=reference --num-per-size 2 --mode sde --steps 2 --seed 4 --device cpu"
    s, o = "--height 32 --width 48".split(), "--height 48 --width 32".split()
    runs = {"alone": s, "first": [*s, *o], "after": [*o, *s]}
    found = {}
    for name, sizes in runs.items():
        assert main(["sample", str(weights_file), "--out", str(tmp_path / name), *flags.split(), *sizes]) == 0
        images = json.loads((tmp_path / name / "samples.json").read_text())["images"]
        found[name] = [
            (image["label"], np.load(tmp_path / name / "latents" / f"{image['index']:06d}.npy"))
            for image in images
            if (image["height"], image["width"]) == (32, 48)
        ]
    capsys.readouterr()
    assert len(found["alone"]) == 2
    for name in ("first", "after"):
        for (label, latent), (want_label, want) in zip(found[name], found["alone"]):
            assert label == want_label and np.array_equal(latent, want), f"32x48 {name} vs alone"
    assert not np.array_equal(found["alone"][0][1], found["alone"][1][1])


def test_run_checkpoint_gives_ema_or_raw_weights(tmp_path):
    from fitscale.checkpoint import CheckpointManager, ModelState
    from fitscale.config.checkpoint import CheckpointConfig
    from fitscale.config.optim import EMAConfig
    from fitscale.parallel.ema import EMA

    model = tiny_model(1)
    ema = EMA(model, EMAConfig(decay=0.5, warmup="none"))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    ema.update(1)
    run_dir = tmp_path / "run"
    manager = CheckpointManager(run_dir, CheckpointConfig(), handle_signals=False)
    manager.save(7, {"model": ModelState(model), "ema": ema})
    (run_dir / "config.yaml").write_text("model:\n  name: tiny\n  overrides:\n    attn_backend: reference\n")
    raw = load_sampling_model(run_dir, ema=False)
    averaged = load_sampling_model(run_dir / "checkpoints" / "step-7")
    for name, param in model.state_dict().items():
        assert torch.equal(raw.state_dict()[name], param)
        assert torch.allclose(averaged.state_dict()[name], ema.shadow[name])
    assert not torch.equal(averaged.state_dict()["x_embedder.proj.weight"], model.x_embedder.proj.weight)
