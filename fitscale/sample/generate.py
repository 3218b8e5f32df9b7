"""The sampling loop: a model ready to sample (from a run's checkpoint or a weights file), then
packed batches of items integrated from noise (t = 0) to data (t = 1) with guidance.

The ODE solvers are fitscale.flow.samplers, guidance is fitscale.flow.guidance; this module only
connects them to models, items and batches.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fitscale.flow.guidance import PackedVelocity
from fitscale.flow.samplers import integrate
from fitscale.sample.options import SamplingOptions, autocast_dtype
from fitscale.sample.plan import SampleItem, batches_by_budget, initial_noise, pack_layout, split_latents


@torch.no_grad()
def generate_latents(
    model: torch.nn.Module, items: list[SampleItem], options: SamplingOptions
) -> list[torch.Tensor]:
    """Latents (C, h, w) float32 on the CPU, one per item in order; the model stays on its device."""
    model.eval()
    config = model.config
    device = next(model.parameters()).device
    dtype = autocast_dtype(options.autocast, device)
    out: list[torch.Tensor] = []
    for group in batches_by_budget(items, options.token_budget, options.cfg_scale != 1.0):
        layout = pack_layout(group, device)
        x = torch.cat([initial_noise(item, config.token_dim, options.seed) for item in group]).to(device)
        velocity = PackedVelocity(model, layout, options.cfg_scale, options.guidance_channels, dtype)
        result = integrate(
            velocity, x, options.sampler, options.steps, options.atol, options.rtol, options.time_shift
        )
        out.extend(split_latents(result.x, group, config.in_channels))
    return out


def load_sampling_model(
    checkpoint: str | Path,
    model_name: str | None = None,
    overrides: dict | None = None,
    ema: bool = True,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """A model in eval mode on `device`, from a run folder / `step-N` checkpoint (DCP) or a weights file.

    A run checkpoint knows its model from the run's config.yaml; a file (.safetensors / .bin / .pt,
    e.g. a released FiTv2 or `fitscale convert export` output) needs `model_name`. `overrides`
    (e.g. extrapolation, attention backend) change the ModelConfig but never its shapes.
    Raises ValueError / FileNotFoundError naming the path and the fix.
    """
    from fitscale.checkpoint.export import load_dcp_weights, model_section
    from fitscale.checkpoint.layout import find_checkpoint
    from fitscale.models import build_model, load_official_checkpoint

    path = Path(checkpoint)
    overrides = dict(overrides or {})
    if path.is_file():
        if model_name is None:
            raise ValueError(f"{path} is a weights file: name its model with --model (e.g. fitv2-xl)")
        with torch.device("meta"):
            model = build_model(model_name, **overrides)
        model.to_empty(device="cpu")
        model.init_weights()
        load_official_checkpoint(model, path, container_key=None if ema else "model")
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
        load_dcp_weights(model, step_dir, ema=ema)
    return model.to(device).eval()
