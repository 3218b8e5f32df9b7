"""A whole sampling run written to a folder, spread over ranks: latents or decoded pictures per
image, then (rank 0) `samples.json`, `grid.png` and the ADM `.npz` batches."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fitscale.data.vae import decode_latents, load_vae
from fitscale.errors import UserError
from fitscale.sample.generate import generate_latents
from fitscale.sample.options import SamplingOptions, options_record
from fitscale.sample.pictures import class_size_grid, preview_latents, save_png, write_npz_by_size
from fitscale.sample.plan import SampleItem


@dataclass
class SampleRun:
    """What `fitscale sample` writes and where; one process's share is `items[rank::world_size]`."""

    out_dir: Path
    items: list[SampleItem]
    options: SamplingOptions = field(default_factory=SamplingOptions)
    vae: str | None = None  # AutoencoderKL folder; None writes latents (and previews)
    preview_channel: int | None = None  # without a VAE: also write this channel as grey PNGs
    grid_size: int = 64  # images in grid.png
    grid_scale: int = 1  # nearest-neighbour upscaling of grid.png (small latents)
    caption: str = ""  # under grid.png (pictures.grid_caption)
    class_names: list[str] | None = None  # row labels of grid.png; None labels rows by class index
    chunk_size: int = 256  # images sampled, decoded and written at a time per rank (memory bound)
    resume: bool = True  # keep the pictures of an interrupted run of the same settings (--overwrite: False)
    weights: str = ""  # which weights sample (checkpoint, EMA or raw): a resume with others is refused


def run_sampling(model: torch.nn.Module, run: SampleRun, rank: int = 0, world_size: int = 1) -> list[Path]:
    """Generate this rank's share and write it; rank 0 then adds the grid, npz files and an index.

    Call on every rank; with world_size > 1 torch.distributed must be initialised (a barrier
    separates the two phases). Returns the files this rank wrote.
    """
    import torch.distributed as dist

    out = run.out_dir
    (out / "images").mkdir(parents=True, exist_ok=True)
    _check_settings(run, rank, world_size)
    mine = run.items[rank::world_size]
    device = next(model.parameters()).device
    # Loaded (and checked) before the ODE runs, so a bad folder fails in seconds, not after sampling.
    vae = load_vae(run.vae, device, model.config.in_channels) if run.vae is not None else None
    have_pictures = vae is not None or run.preview_channel is not None
    written: list[Path] = []
    if run.resume:  # an interrupted run of the same settings: its finished images are kept
        mine = [item for item in mine if not all(p.is_file() for p in _outputs(run, item, have_pictures))]
    for start in range(0, len(mine), run.chunk_size):  # never more than a chunk of pictures in memory
        chunk = mine[start : start + run.chunk_size]
        latents = generate_latents(model, chunk, run.options)
        if run.vae is None:
            (out / "latents").mkdir(exist_ok=True)
            for item, latent in zip(chunk, latents):
                path = out / "latents" / f"{item.index:06d}.npy"
                np.save(path, latent.numpy())
                written.append(path)
        pictures: list[np.ndarray] = []
        if vae is not None:
            pictures = decode_latents(vae, latents)
        elif run.preview_channel is not None:
            pictures = preview_latents(latents, run.preview_channel)
        for item, picture in zip(chunk, pictures):
            path = _picture_path(run, item)
            tmp = path.with_name(path.name + ".tmp")  # a picture on disk is whole: resume trusts it
            save_png(picture, tmp)
            tmp.replace(path)
            written.append(path)
    if world_size > 1:
        dist.barrier()
    if rank == 0:
        written += _write_summary(run, have_pictures)
    return written


def _picture_path(run: SampleRun, item: SampleItem) -> Path:
    return run.out_dir / "images" / f"{item.index:06d}_class{item.label}_{item.height}x{item.width}.png"


def _outputs(run: SampleRun, item: SampleItem, have_pictures: bool) -> list[Path]:
    paths = [_picture_path(run, item)] if have_pictures else []
    return paths + ([run.out_dir / "latents" / f"{item.index:06d}.npy"] if run.vae is None else [])


def _check_settings(run: SampleRun, rank: int, world_size: int) -> None:
    """Record the run's settings in `sampling.json` (rank 0) and refuse to resume into a folder
    sampled with other settings: UserError naming the folder and what differs."""
    import torch.distributed as dist

    settings = {
        "options": options_record(run.options),
        "weights": run.weights,
        "vae": run.vae,
        "preview_channel": run.preview_channel,
        "items": [[i.index, i.label, i.rows, i.cols] for i in run.items],
        # How noise is keyed (fitscale.sample.plan.noise_seed): a folder sampled with the older
        # global-index keying lacks this and is refused rather than resumed with other noise.
        "noise": "seed,size,index_in_size",
    }
    settings = json.loads(json.dumps(settings))  # as read back (tuples become lists)
    path = run.out_dir / "sampling.json"
    if rank == 0:
        if run.resume and path.is_file():
            held = json.loads(path.read_text())
            for key, value in settings.items():
                if held.get(key) != value:
                    raise UserError(
                        f"{run.out_dir} holds pictures of another sampling run ({key} differs); pick another "
                        "--out, or pass --overwrite to sample every image again"
                    )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(settings))
        tmp.replace(path)
    if world_size > 1:
        dist.barrier()


def _write_summary(run: SampleRun, have_pictures: bool) -> list[Path]:
    from PIL import Image

    out = run.out_dir
    written = []
    index = [
        {
            "index": i.index,
            "label": i.label,
            "height": i.height,
            "width": i.width,
            "rows": i.rows,
            "cols": i.cols,
        }
        for i in run.items
    ]
    (out / "samples.json").write_text(
        json.dumps({"options": options_record(run.options), "images": index}, indent=1)
    )
    written.append(out / "samples.json")
    if have_pictures:
        files = {int(p.name[:6]): p for p in (out / "images").glob("*.png")}
        shown = run.items[: run.grid_size]  # only the grid's pictures are held in memory
        pictures = [np.asarray(Image.open(files[i.index]).convert("RGB")) for i in shown]
        grid = class_size_grid(
            shown,
            pictures,
            run.class_names,
            run.caption,
            size_unit="pixels" if run.vae is not None else "tokens",
            scale=run.grid_scale,
        )
        save_png(grid, out / "grid.png")
        written.append(out / "grid.png")
        written += write_npz_by_size(out, run.items, [files[i.index] for i in run.items])
    return written
