"""Gather the outcome of every run of a sweep into `<out_dir>/results.json`.

For each run with a checkpoint: its newest step, the mean training loss of its last logged steps,
and the held-out validation loss (fitscale.train.validation: fixed timestep grid, fixed noise) of
its raw and EMA weights, measured here on one process so every run is scored identically, with
the EMA's warmup and the weight it still gives the initial weights (`ema_initial_weight`).
With `fid:` in the spec, also ADM's FID (and sFID, IS, precision, recall; fitscale.eval) of EMA
samples against a reference batch. With `digits_quality:`, the digits runs' sample quality
(fitscale.eval.digits_quality): `digits_recognised`, `digits_error` (1 - recognised) and `digits_frechet`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch

from fitscale.errors import UserError
from fitscale.parallel.ema import ema_initial_weight
from fitscale.sample.generate import load_sampling_model
from fitscale.sample.options import SamplingOptions
from fitscale.sample.plan import plan_items
from fitscale.sample.run import SampleRun, run_sampling
from fitscale.sweep.launch import resolved_configs, run_status
from fitscale.sweep.spec import SweepSpec, plan_sweep, run_dir, validation_settings
from fitscale.train.records import METRICS_FILE, live_records
from fitscale.train.validation import run_validation, validation_batches

RESULTS_FILE = "results.json"
TRAIN_LOSS_WINDOW = 10  # logged steps averaged for the final training loss


def final_train_loss(folder: Path, window: int = TRAIN_LOSS_WINDOW) -> float | None:
    """Mean `loss` of the last `window` records of metrics.jsonl's live branch that carry one
    (fitscale.train.records: steps of abandoned attempts and branches do not count)."""

    if not (folder / METRICS_FILE).is_file():
        return None
    losses = []
    for record in live_records(folder):
        loss = record.get("loss")
        if isinstance(loss, (int, float)) and math.isfinite(loss):
            losses.append(float(loss))
    return sum(losses[-window:]) / len(losses[-window:]) if losses else None


def _validation_data(spec: SweepSpec, config):
    import dataclasses

    val_path = spec.validation.get("val_path") or config.data.val_path
    if not val_path:
        raise UserError(
            f"sweep {spec.name!r}: no held-out split; set data.val_path in {spec.recipe} or validation.val_path in the spec"
        )
    return dataclasses.replace(config.data, val_path=val_path, val_remote=config.data.val_remote)


def _fid(spec: SweepSpec, model: torch.nn.Module, folder: Path) -> dict[str, Any]:
    """ADM's metrics (fitscale.eval) of EMA samples against the spec's reference batch: `fid` and
    the rest under `fid_*` names (sfid, inception_score, precision, recall, comparable)."""
    from fitscale.eval.evaluate import EvalSettings, evaluate  # lazy: optional extra
    from fitscale.eval.inception import WEIGHTS_SHA256_PREFIX  # lazy: optional extra

    fid = spec.fid
    height, width = fid.get("size", [256, 256])
    items = plan_items([(height, width)], int(fid.get("num_images", 1000)), model.config.num_classes)
    options = SamplingOptions(
        sampler=fid.get("sampler", "euler"),
        steps=int(fid["steps"]) if "steps" in fid else None,
        cfg_scale=float(fid.get("cfg", 1.0)),
        batch_invariant=False,  # the same images for every run of the sweep, drawn together: packed
    )
    out = folder / "fid_samples"
    # resume=False: the images of an earlier collect came from an earlier checkpoint
    run = SampleRun(
        out, items, options, vae=fid.get("vae"), preview_channel=fid.get("preview_channel"), resume=False
    )
    run_sampling(model, run)
    settings = EvalSettings(
        inception_weights=fid.get("inception_weights"),
        inception_sha256=fid.get("inception_sha256", WEIGHTS_SHA256_PREFIX),
        device=str(next(model.parameters()).device),
        ref_stats_from_arr0=bool(fid.get("ref_stats_from_arr0", False)),
    )
    result = evaluate(out, fid["reference"], settings)
    names = ("sfid", "inception_score", "precision", "recall", "comparable")
    return {"fid": result["fid"], **{f"fid_{name}": result[name] for name in names}}


def _digits_quality(spec: SweepSpec, folder: Path) -> dict[str, Any]:
    """The digits quality metric of the run's newest checkpoint under the spec's `digits_quality` settings."""
    from fitscale.eval.digits_quality import QualitySettings, digits_quality  # lazy: optional extra

    result = digits_quality(folder, QualitySettings.from_dict(spec.digits_quality, f"sweep {spec.name!r}"))
    return {
        "digits_recognised": result.recognised,
        "digits_error": 1.0 - result.recognised,
        "digits_frechet": result.frechet,
        "digits_images": result.images,
    }


def collect_sweep(spec: SweepSpec, device: str = "auto") -> list[dict[str, Any]]:
    """Score every run and write `<out_dir>/results.json`; returns its rows (runs without a checkpoint too).
    UserError, and nothing written, when no run has a checkpoint yet."""

    runs = plan_sweep(spec)
    if all(run_status(spec, run)[1] is None for run in runs):
        raise UserError(
            f"sweep {spec.name!r}: no run has a checkpoint under {spec.out_dir} yet; run `fitscale sweep launch` first"
        )
    configs = resolved_configs(spec, runs)
    device = (
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    settings = validation_settings(spec)
    batches_by_path: dict[str, list] = {}
    rows = []
    for run, config in zip(runs, configs):
        folder = run_dir(spec, run)
        status, step = run_status(spec, run)
        row: dict[str, Any] = {
            **run.row(spec.mfu, spec.peak_flops),
            "status": status,
            "step": step,
            "train_loss": final_train_loss(folder),
        }
        if step is not None:
            data = _validation_data(spec, config)
            if data.val_path not in batches_by_path:
                batches_by_path[data.val_path] = validation_batches(data, max_images=settings.max_images)
            batches = batches_by_path[data.val_path]
            raw = load_sampling_model(folder, ema=False, device=device)
            run_settings = dataclasses.replace(settings, ddpm=config.train.ddpm)  # a ddpm run's diffusion
            row.update(run_validation(raw, batches, run_settings))
            if config.optim.ema.enabled:
                row["ema_warmup"] = config.optim.ema.warmup
                row["ema_initial_weight"] = ema_initial_weight(config.optim.ema, step)
                ema_model = load_sampling_model(folder, ema=True, device=device)
                averaged = run_validation(ema_model, batches, run_settings)
                row.update({f"{k}_ema": v for k, v in averaged.items() if k != "val_images"})
                if spec.fid:
                    row.update(_fid(spec, ema_model, folder))
            if spec.digits_quality:
                row.update(_digits_quality(spec, folder))
            # Compute actually spent: the planned step count may not be reached yet.
            row["training_flops_done"] = float(run.flops_per_step) * step
        rows.append(row)
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / (RESULTS_FILE + ".partial")
    partial.write_text(json.dumps({"sweep": spec.name, "runs": rows}, indent=1))
    partial.replace(out / RESULTS_FILE)
    return rows


def read_results(spec: SweepSpec) -> list[dict[str, Any]]:
    """The runs of `<out_dir>/results.json`; FileNotFoundError saying to run `fitscale sweep collect`
    first.
    """
    path = Path(spec.out_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `fitscale sweep collect` first")
    return json.loads(path.read_text())["runs"]
