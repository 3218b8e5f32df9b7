"""The sampling loop: a model ready to sample (from a run's checkpoint or a weights file), then
packed batches of items integrated from noise (t = 0) to data (t = 1) with guidance.

The ODE solvers are fitscale.flow.samplers (adaptive ones one solve per image through
fitscale.flow.per_image), the SDE fitscale.flow.sde, guidance fitscale.flow.guidance; this module
only connects them to models, items and batches.

Batch invariance. A packed forward's fp32 arithmetic depends on the pack: a matrix product over
T rows picks its kernel blocking (and so the order of its sums) from T, and attention and norms
run over shapes set by the batch mates, so one image's velocity moves by ~1e-7 with the batch.
A grid sampler carries that to its end; an adaptive solver can flip an accept/reject decision of
its step controller, after which the image differs by about the solver's tolerance (4e-4
relative was seen on a trained digits model with dopri5 and guidance). With
`SamplingOptions.batch_invariant` (the default) every image is therefore sampled alone: its own
forwards (conditional and unconditional copy together, as alone), its own solve, its own noise.
Its arithmetic is then the same call sequence whichever batch, rank or rank count draws it, and
its latents are the same bit for bit on a given machine and thread count. The cost is the loss of
batching (docs/benchmarks.md, "Batch-invariant sampling"); `batch_invariant=False` packs images
up to `token_budget` tokens per forward for throughput.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from fitscale.checkpoint.export import load_dcp_weights, matching_presets, model_section
from fitscale.checkpoint.layout import find_checkpoint, read_metadata
from fitscale.config.ddpm import DdpmConfig
from fitscale.errors import UserError
from fitscale.flow.ddpm import create_diffusion, p_sample_loop
from fitscale.flow.guidance import PackedVelocity
from fitscale.flow.per_image import integrate_per_image
from fitscale.flow.samplers import TOLERANCE_METHODS, integrate
from fitscale.flow.sde import sample_sde
from fitscale.models import build_model
from fitscale.models.official import load_official_state_dict, read_checkpoint_file
from fitscale.sample.options import DDPM, SamplingOptions, autocast_dtype, check_objective
from fitscale.sample.plan import (
    SampleItem,
    batches_by_budget,
    initial_noise,
    pack_layout,
    split_latents,
    step_noise,
)


def integrate_batch(
    velocity: PackedVelocity, items: list[SampleItem], x: torch.Tensor, options: SamplingOptions
) -> torch.Tensor:
    """The packed noise x (T, p*p*C) of `items` at t = 0 -> their packed latents at t = 1 (for the
    ddpm sampler: x_T -> x_0, each step's noise keyed per image like the SDE's)."""
    if options.sampler == DDPM and options.mode == "ode":
        diffusion = create_diffusion(options.ddpm, velocity.model.config.learn_sigma, str(options.steps))
        return p_sample_loop(
            velocity, diffusion, x, lambda step: step_noise(items, x.shape[1], options.seed, step).to(x)
        )
    if options.mode == "sde":
        return sample_sde(
            velocity,
            x,
            lambda step: step_noise(items, x.shape[1], options.seed, step).to(x),
            options.steps,
            options.sde_sampler,
            options.diffusion_form,
            options.diffusion_norm,
            options.last_step,
            options.last_step_size,
            options.time_shift,
        ).x
    if options.sampler not in TOLERANCE_METHODS:  # grid methods are elementwise: all images in one state
        return integrate(velocity, x, options.sampler, options.steps, time_shift=options.time_shift).x
    # An error norm chooses the steps (or the corrector's iterations): one solve per image.
    states = list(x.split([item.tokens for item in items]))
    args = (options.sampler, options.steps or 0, options.atol, options.rtol, options.time_shift)
    return torch.cat(integrate_per_image(velocity.images, states, *args).xs)


@torch.no_grad()
def generate_latents(
    model: torch.nn.Module, items: list[SampleItem], options: SamplingOptions
) -> list[torch.Tensor]:
    """Latents (C, h, w) float32 on the CPU, one per item in order; the model stays on its device.

    With `options.batch_invariant` each item is sampled alone (bit-identical whatever its batch
    mates), else items share packed forwards of up to `options.token_budget` tokens. A float64
    model samples in float64 and gives float64 latents. Packed (not batch-invariant): raises
    ValueError for an item over the token budget; alone, an image of any size is one forward, and
    the budget is not used."""
    model.eval()
    config = model.config
    check_objective(config.objective, options)
    device = next(model.parameters()).device
    dtype = autocast_dtype(options.autocast, device)
    precise = next(model.parameters()).dtype == torch.float64  # a float64 model samples in float64
    out: list[torch.Tensor] = []
    if options.batch_invariant:  # one image per forward and per solve (module docstring): no budget
        groups = [[item] for item in items]
    else:
        groups = batches_by_budget(items, options.token_budget, options.cfg_scale != 1.0)
    for group in groups:
        layout = pack_layout(group, device)
        x = torch.cat([initial_noise(item, config.token_dim, options.seed) for item in group])
        x = x.to(device, torch.float64 if precise else torch.float32)
        velocity = PackedVelocity(
            model, layout, options.cfg_scale, options.guidance_channels, dtype, options.scale_pow
        )
        out.extend(split_latents(integrate_batch(velocity, group, x, options), group, config.in_channels))
    return out


def run_config_yaml(checkpoint: str | Path) -> dict:
    """The run's config.yaml of a run checkpoint as a dict; {} for a weights file or a run without one."""
    path = Path(checkpoint)
    if path.is_file():
        return {}
    config_file = find_checkpoint(path).parent.parent / "config.yaml"
    if not config_file.is_file():
        return {}
    import yaml

    return yaml.safe_load(config_file.read_text()) or {}


def training_ddpm(checkpoint: str | Path) -> DdpmConfig:
    """The `train.ddpm` diffusion a run checkpoint was trained with: the config its own `fitscale.json`
    records (a resume may rewrite the run's config.yaml, not what an older checkpoint was saved with),
    else the run's config.yaml (checkpoints written before they recorded a config); the release's
    defaults for a weights file (create_diffusion's, configs/fit/config_fit_xl.yaml)."""
    path = Path(checkpoint)
    recorded = {} if path.is_file() else read_metadata(find_checkpoint(path)).get("config") or {}
    section = (recorded.get("train") or {}).get("ddpm")
    if section is None:
        section = (run_config_yaml(checkpoint).get("train") or {}).get("ddpm") or {}
    return DdpmConfig(**section)


def training_dataset(checkpoint: str | Path) -> Path | None:
    """The dataset (`data.path` of the run's config.yaml) a run checkpoint was trained on; None for
    a weights file or a run whose config names none."""

    data = run_config_yaml(checkpoint).get("data") or {}
    return Path(data["path"]) if data.get("path") else None


def file_preset(path: Path, weights: dict[str, torch.Tensor]) -> str:
    """The preset of a weights file given without --model: the only one whose width and depth match
    its weights (`fitscale convert`'s test), said on stderr by rank 0. UserError asking for --model when none
    or several match (a `-hr` preset has its base's shapes but another RoPE)."""
    names = matching_presets(weights)
    if len(names) == 1:
        if os.environ.get("RANK", "0") == "0":
            print(
                f"{path}: sampled as --model {names[0]} (the only preset of its width and depth)",
                file=sys.stderr,
            )
        return names[0]
    hint = f"{' or '.join(names)}: both match its shapes" if names else "e.g. fitv2-xl"
    raise UserError(f"{path} is a weights file: name its model with --model ({hint})")


def load_sampling_model(
    checkpoint: str | Path,
    model_name: str | None = None,
    overrides: dict | None = None,
    ema: bool = True,
    device: str | torch.device = "cpu",
    raw_hint: str = "pass --raw to use the raw weights",
) -> torch.nn.Module:
    """A model in eval mode on `device`, from a run folder / `step-N` checkpoint (DCP) or a weights file.

    A run checkpoint knows its model from the run's config.yaml; a file (.safetensors / .bin / .pt,
    e.g. a released FiTv2 or `fitscale convert export` output) takes `model_name`, else the one
    preset its shapes match (`file_preset`). `overrides`
    (e.g. extrapolation, attention backend) change the ModelConfig but never its shapes.
    Raises ValueError / FileNotFoundError naming the path and the fix; a checkpoint with no EMA
    asked for its EMA names `raw_hint`, how this caller asks for the raw weights.
    """

    path = Path(checkpoint)
    overrides = dict(overrides or {})
    if path.is_file():
        weights = read_checkpoint_file(path, container_key=None if ema else "model")
        with torch.device("meta"):
            model = build_model(model_name or file_preset(path, weights), **overrides)
        model.to_empty(device="cpu")
        model.init_weights()
        load_official_state_dict(model, weights)
    else:
        step_dir = find_checkpoint(path)
        section = model_section(step_dir)
        if section is None:
            raise FileNotFoundError(
                f"{step_dir.parent.parent / 'config.yaml'} is missing: a DCP checkpoint is read with its run's "
                "config.yaml; pass --model for a weights file"
            )
        run_name, run_overrides = section.get("name", "tiny"), dict(section.get("overrides") or {})
        with torch.device("meta"):
            model = build_model(model_name or run_name, **{**run_overrides, **overrides})
        model.to_empty(device="cpu")
        model.init_weights()
        load_dcp_weights(model, step_dir, ema=ema, raw_hint=raw_hint)
    return model.to(device).eval()
