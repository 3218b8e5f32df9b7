"""`from-images`: a folder of images -> VAE latents with the paper's preprocessing.

Preprocessing (per image, resolution S): downscale keeping the aspect ratio to at most S*S
pixels of area (never upscale), floor both sides to multiples of the pixels per token (16 for an
8x VAE and patch size 2, 32 for DC-AE f32 and patch size 1), and, when both sides exceed S, also a
centre-crop variant (short side resized to S, centre S x S). Each variant is encoded with its
horizontal flip. The encoder is a diffusers autoencoder (fitscale/data/autoencoders.py) loaded from
a local folder, in bfloat16 on a GPU and float32 on the CPU; latents are its deterministic encoding
normalised by its
`scaling_factor` and `shift_factor` or `latents_mean`/`latents_std` (fitscale/data/vae.py, recorded
in the dataset's fitscale.json), so a rewrite gives identical data. Images of one part are encoded in batches
of equal size, on the GPU when one is present.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fitscale.data.format import LatentSample, patchify
from fitscale.data.pixels import encode_image, write_part_pixels
from fitscale.data.vae import PIXELS_PER_TOKEN, encode_pixels, load_vae
from fitscale.data.writer import SkipSample
from fitscale.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


def list_image_folder(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, label) of every image in an ImageFolder layout (one subfolder per class, sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"{root}: no class subfolders; use the ImageFolder layout ROOT/CLASS/IMAGE")
    inputs = [
        (str(path), label)
        for label, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not inputs:
        raise UserError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under its class folders")
    return inputs, classes


def resize_to_area(image, resolution: int, step: int = PIXELS_PER_TOKEN):
    """Downscale to at most resolution^2 pixels, aspect kept, sides floored to multiples of `step`
    (pixels per token); None when a side would be under one token."""
    from PIL import Image

    width, height = image.size
    scale = min(1.0, math.sqrt(resolution * resolution / (width * height)))
    new_w, new_h = int(width * scale) // step * step, int(height * scale) // step * step
    if new_w < step or new_h < step:
        return None
    scaled = image.resize((max(new_w, int(width * scale)), max(new_h, int(height * scale))), Image.BICUBIC)
    left, top = (scaled.width - new_w) // 2, (scaled.height - new_h) // 2
    return scaled.crop((left, top, left + new_w, top + new_h))


def centre_crop(image, resolution: int):
    """Short side resized to `resolution`, then the centre square (ADM's centre crop)."""
    from PIL import Image

    scale = resolution / min(image.size)
    scaled = image.resize(
        (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
        Image.BICUBIC,
    )
    left, top = (scaled.width - resolution) // 2, (scaled.height - resolution) // 2
    return scaled.crop((left, top, left + resolution, top + resolution))


def prepare_image(job: tuple[str, int, int, str | None]):
    """Decode and resize one image (`job`: path, resolution, pixels per token, pixels codec or None):
    {"tokens": resized, "crop": centre crop or None} as PIL images, with "pixels": both compressed
    in the codec (fitscale.data.pixels; crop None when absent) when one is given, or a SkipSample.
    Runs in a decode worker."""
    from PIL import Image

    path, resolution, step, codec = job
    try:
        with Image.open(path) as raw:
            image = raw.convert("RGB")
    except Exception as error:
        return SkipSample("unreadable image", path, f"{type(error).__name__}: {error}")
    resized = resize_to_area(image, resolution, step)
    if resized is None:
        return SkipSample("under token minimum", path, f"{image.width}x{image.height} pixels")
    crop = centre_crop(image, resolution) if min(image.size) > resolution else None
    prepared = {"tokens": resized, "crop": crop}
    if codec is not None:
        prepared["pixels"] = tuple(
            None if p is None else encode_image(np.asarray(p), codec) for p in (resized, crop)
        )
    return prepared


def build_from_images(
    vae_path: str,
    resolution: int,
    batch_size: int,
    dtype: str,
    device: str | None = None,
    patch_size: int = 2,
    downsample: int = 8,
    workers: int = 0,
    pixels_to: str | Path | None = None,
    pixels_codec: str = "png",
):
    """The part builder of `from-images`: pictures -> latents with the preprocessing above.

    The autoencoder at `vae_path` (downsampling by `downsample`) is loaded on first use, on
    `device` (CUDA when present by default; bfloat16 there, float32 on the CPU), and encodes
    equal-size pictures `batch_size` at a time; latents are cut into `patch_size` x `patch_size`
    patches and stored in `dtype`. Unreadable or too small pictures become SkipSamples. Decoding
    and resizing run in a pool of `workers` processes (inline for 0); the result is the same.
    With `pixels_to` (the dataset folder), the resized pictures are also compressed in `pixels_codec`
    and kept per part (fitscale.data.pixels.write_part_pixels) for an alignment encoder: the pixels
    `fitscale data pixels --images` would write, in the same pass.
    """
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    step = downsample * patch_size  # pixels per token a side
    state: dict = {}

    def encode(pictures: list) -> list[np.ndarray]:
        """Equal-size PIL images -> (C, h, w) latents, batched."""
        if "vae" not in state:
            state["vae"] = load_vae(vae_path, device, purpose="from-images")
            if torch.device(device).type == "cuda":
                state["vae"] = state["vae"].to(torch.bfloat16)
        vae = state["vae"]
        out = []
        for start in range(0, len(pictures), batch_size):
            chunk = np.stack([np.asarray(p, dtype=np.float32) for p in pictures[start : start + batch_size]])
            pixels = torch.from_numpy(chunk).permute(0, 3, 1, 2).to(device) / 127.5 - 1.0
            latents = encode_pixels(vae, pixels)
            out.extend(latents.float().cpu().numpy())
        return out

    def build(inputs: Sequence[tuple[str, int]], first: int) -> Iterator[LatentSample | SkipSample]:
        from PIL import ImageOps

        codec = pixels_codec if pixels_to is not None else None
        jobs = [(path, resolution, step, codec) for path, _ in inputs]
        if workers > 0:
            if "pool" not in state:
                import multiprocessing

                # forked before the autoencoder loads (it loads with the first batch to encode)
                state["pool"] = multiprocessing.get_context("fork").Pool(workers)
            prepared = state["pool"].map(prepare_image, jobs, chunksize=max(1, len(jobs) // (4 * workers)))
        else:
            prepared = [prepare_image(job) for job in jobs]
        groups: dict[tuple[int, int], list[tuple[int, str, int]]] = defaultdict(list)
        for i, item in enumerate(prepared):
            if isinstance(item, dict):
                for key in ("tokens", "crop"):
                    if item[key] is not None:
                        groups[item[key].size].append((i, key, 0))
                        groups[item[key].size].append((i, key, 1))
        latents: dict[tuple[int, str, int], np.ndarray] = {}
        for members in groups.values():
            pictures = [
                prepared[i][key] if flip == 0 else ImageOps.mirror(prepared[i][key])
                for i, key, flip in members
            ]
            latents.update(zip(members, encode(pictures)))
        for i, ((path, label), item) in enumerate(zip(inputs, prepared)):
            if isinstance(item, SkipSample):
                yield item
                continue
            sample = LatentSample(
                tokens=np.stack([patchify(latents[i, "tokens", f], patch_size) for f in (0, 1)]).astype(
                    dtype
                ),
                rows=item["tokens"].height // step,
                cols=item["tokens"].width // step,
                label=label,
                source_id=first + i,
                source=path,
            )
            if item["crop"] is not None:
                sample.crop = np.stack([patchify(latents[i, "crop", f], patch_size) for f in (0, 1)]).astype(
                    dtype
                )
                sample.crop_rows = sample.crop_cols = resolution // step
            yield sample
        if pixels_to is not None:  # after the last sample: before the part is renamed into place
            kept = [(first + i, *item["pixels"]) for i, item in enumerate(prepared) if isinstance(item, dict)]
            write_part_pixels(pixels_to, first, kept)

    return build
