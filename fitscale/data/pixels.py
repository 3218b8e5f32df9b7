"""Pixels beside the latents, for an alignment loss whose frozen encoder sees each image (REPA).

The encoder needs each training image's pixels in the same crop and flip variant as the latent
that the step uses. A dataset folder holds them as three side files, written after the latents:
- `pixels.bin`: every image compressed (PNG, lossless, by default; or JPEG q95 / WebP q90), back to back;
- `pixels.npy`: int64 (num_source_ids, 2, 2): (offset, length) in `pixels.bin` of source id i's
  picture [i, 0] and of its centre-crop variant's own picture [i, 1] (length 0: none);
- `pixels.json`: format, codec and `pixels_per_token`, the pixels of one latent token's side
  (16 for an 8x VAE with 2x2 patches; 8 for the digits). Written last: without it there are no
  pixels.
A stored picture is the full (uncropped, unflipped) latent's picture, rows*ppt x cols*ppt. The
variant a batch uses is found from its grid: the picture whose grid it is (the full one, else the
crop variant's own picture, which `from-images` makes by a separate resize), else the centre
rows'*ppt x cols'*ppt of the full picture (the crop of fitscale.data.sources.synth_sample); the
flipped variant is read mirrored. `fitscale data digits` writes pixels with its latents, and
`fitscale data pixels DIR [--images ROOT]` adds them to a digits or `from-images` dataset.

Why pixels and not precomputed features (docs/repa.md, measured by tools/repa_bytes.py): DINOv2-B's
features of a 16x16-token image are 256 x 768 x 2 bytes (fp16) = 393,216 bytes per variant (786,432
with the flip) and tie the dataset to one encoder, while the photograph at 224x224 is a median
85 kB as PNG and 23 kB as JPEG q95 for every variant and every encoder.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from fitscale.data.format import (
    COLS,
    CROP_COLS,
    CROP_ROWS,
    ROWS,
    SOURCE_ID,
    atomic_save_npy,
    atomic_write_text,
    read_meta,
    read_sample_table,
)
from fitscale.data.sources import digit_canvas
from fitscale.errors import UserError

PIXELS_META = "pixels.json"
PIXELS_BIN = "pixels.bin"
PIXELS_INDEX = "pixels.npy"
PIXELS_FORMAT = "fitscale-pixels"


CODECS = {
    "png": {"format": "PNG"},
    "jpeg": {"format": "JPEG", "quality": 95},
    "webp": {"format": "WEBP", "quality": 90},
}


def encode_image(image: np.ndarray, codec: str = "png") -> bytes:
    """uint8 (H, W) or (H, W, 3) -> bytes in `codec` (png lossless; jpeg q95, webp q90 lossy)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, **CODECS[codec])
    return buffer.getvalue()


def write_pixels(
    path: str | Path,
    images: Iterable[tuple[int, np.ndarray, np.ndarray | None]],
    pixels_per_token: int,
    overwrite: bool = False,
    codec: str = "png",
) -> dict:
    """Write the pixel side files of dataset `path` from (source id, uint8 picture, uint8 picture of
    the centre-crop variant or None) items, each compressed with `codec` (one of CODECS); returns the meta.

    Raises FileExistsError when the dataset has pixels already (unless `overwrite`): written pixels are
    never replaced silently.
    """
    encoded = (
        (
            source_id,
            *(
                None if p is None else encode_image(np.ascontiguousarray(p, dtype=np.uint8), codec)
                for p in pictures
            ),
        )
        for source_id, *pictures in images
    )
    return write_encoded_pixels(path, encoded, pixels_per_token, overwrite, codec)


def write_encoded_pixels(
    path: str | Path,
    images: Iterable[tuple[int, bytes, bytes | None]],
    pixels_per_token: int,
    overwrite: bool = False,
    codec: str = "png",
) -> dict:
    """`write_pixels` of pictures already compressed with `codec`: (source id, bytes of the picture,
    bytes of the centre-crop variant's picture or None) items. Same files, same refusal."""

    path = Path(path)
    meta_path = path / PIXELS_META
    if meta_path.exists() and not overwrite:
        raise FileExistsError(
            f"{path}: has pixels already ({PIXELS_META}); pass --overwrite to write them again"
        )
    meta_path.unlink(missing_ok=True)  # without it the other files count as absent while they are rewritten
    entries: dict[tuple[int, int], tuple[int, int]] = {}  # (source id, variant) -> (offset, length)
    offset = 0
    with open(path / PIXELS_BIN, "wb") as out:
        for source_id, *pictures in images:
            for variant, data in enumerate(pictures):
                if data is None:
                    continue
                out.write(data)
                entries[int(source_id), variant] = (offset, len(data))
                offset += len(data)
    index = np.zeros((max((k[0] for k in entries), default=-1) + 1, 2, 2), dtype=np.int64)
    for (source_id, variant), entry in entries.items():
        index[source_id, variant] = entry
    atomic_save_npy(path / PIXELS_INDEX, index)
    meta = {
        "format": PIXELS_FORMAT,
        "version": 1,
        "codec": codec,
        "pixels_per_token": int(pixels_per_token),
        "images": len({source_id for source_id, _ in entries}),
        "bytes": offset,
    }
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    return meta


def missing_pixels_message(path: str | Path, field: str = "train.repa.encoder") -> str:
    """The one line refusing a dataset without pixels, with what to run."""
    return (
        f"data.path={path} has no pixels ({PIXELS_META}) for the alignment loss of {field}: run "
        f"`fitscale data pixels {path}` (digits), or add `--images ROOT --resolution S` (from-images)"
    )


class PixelStore:
    """Read access to a dataset's pixels: `image(source_id, rows, cols, flip)` decodes one variant.

    Raises FileNotFoundError (the `missing_pixels_message` line) for a dataset without pixels.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / PIXELS_META
        if not meta_path.is_file():
            raise FileNotFoundError(missing_pixels_message(self.path))
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != PIXELS_FORMAT:
            raise UserError(f"{meta_path}: not a fitscale pixels file; write the pixels again")
        self.pixels_per_token = int(self.meta["pixels_per_token"])
        self.index = np.load(self.path / PIXELS_INDEX)
        if self.index.ndim != 3 or self.index.shape[1:] != (2, 2):
            raise UserError(
                f"{self.path / PIXELS_INDEX}: index of shape {self.index.shape}, not (N, 2, 2); write the pixels "
                f"again: fitscale data pixels {self.path} --overwrite"
            )
        self.data = (
            np.memmap(self.path / PIXELS_BIN, dtype=np.uint8, mode="r") if self.meta["bytes"] else None
        )

    def _picture(self, source_id: int, variant: int) -> np.ndarray | None:
        offset, length = self.index[source_id, variant] if 0 <= source_id < len(self.index) else (0, 0)
        if not length:
            return None
        from PIL import Image

        picture = Image.open(io.BytesIO(self.data[offset : offset + length].tobytes())).convert("RGB")
        return np.asarray(picture)

    def image(self, source_id: int, rows: int, cols: int, flip: bool = False) -> np.ndarray:
        """uint8 (rows*ppt, cols*ppt, 3) pixels of the variant of `source_id` on a rows x cols token
        grid: the stored picture of that grid (full or crop variant), else the full picture's centre,
        mirrored when `flip`. ValueError names the sample when it has no pixels or only pictures
        smaller than the grid."""
        ppt = self.pixels_per_token
        pixels = self._picture(source_id, 0)
        if pixels is None:
            raise UserError(f"{self.path}: sample {source_id} has no pixels; write the pixels again")
        full_rows, full_cols = pixels.shape[0] // ppt, pixels.shape[1] // ppt
        if (rows, cols) != (full_rows, full_cols):
            crop = self._picture(source_id, 1)
            if crop is not None and (crop.shape[0] // ppt, crop.shape[1] // ppt) == (rows, cols):
                pixels, full_rows, full_cols = crop, rows, cols
        if rows > full_rows or cols > full_cols:
            raise UserError(
                f"{self.path}: sample {source_id} has pixels for a {full_rows}x{full_cols} grid, not "
                f"{rows}x{cols}; write the pixels again"
            )
        top, left = (full_rows - rows) // 2 * ppt, (full_cols - cols) // 2 * ppt
        pixels = pixels[top : top + rows * ppt, left : left + cols * ppt]
        return np.array(pixels[:, ::-1] if flip else pixels)  # a writable copy


def digit_picture(image: np.ndarray, rows: int, cols: int, pixels_per_token: int) -> np.ndarray:
    """An 8x8 digit (0..16) drawn as fitscale.data.sources.render_digit draws latent channel 0, at
    `pixels_per_token` px per token: uint8 (rows*ppt, cols*ppt), ink white on black, centred."""

    canvas = digit_canvas(image, rows * pixels_per_token, cols * pixels_per_token)
    return (canvas * 255.0 + 0.5).astype(np.uint8)


DIGITS_PIXELS_PER_TOKEN = 8


def write_digit_pixels(
    path: str | Path,
    pixels_per_token: int = DIGITS_PIXELS_PER_TOKEN,
    overwrite: bool = False,
    codec: str = "png",
) -> dict:
    """The pixels of a digits dataset (`fitscale data digits`), drawn again from scikit-learn's digits:
    its source id s is digit s mod 1797 (the writer lists variant by variant), its grid from samples.npy.
    ValueError for a dataset another writer wrote."""
    from sklearn.datasets import load_digits

    meta = read_meta(path)
    if meta.get("writer") != "digits":
        raise UserError(
            f"{path}: written by `fitscale data {meta.get('writer')}`, not digits; for a from-images dataset "
            "pass its image folder: fitscale data pixels DIR --images ROOT --resolution S"
        )
    digits = load_digits().images
    table = read_sample_table(path, int(meta["num_samples"]))

    def pictures():
        for row in table:
            source_id = int(row[SOURCE_ID])
            yield (
                source_id,
                digit_picture(
                    digits[source_id % len(digits)], int(row[ROWS]), int(row[COLS]), pixels_per_token
                ),
                None,  # the digits have no crop variant
            )

    return write_pixels(path, pictures(), pixels_per_token, overwrite=overwrite, codec=codec)


def write_image_pixels(
    path: str | Path, images: str | Path, resolution: int, overwrite: bool = False, codec: str = "png"
) -> dict:
    """The pixels of a `from-images` dataset, prepared again from its image folder `images` exactly as
    the latents were (fitscale.data.images: the area resize, and the centre crop when both sides
    exceed `resolution`), at the dataset's pixels per token (its autoencoder's downsampling x its patch
    size: 16 for SD-VAE latents in 2 x 2 patches, 32 for DC-AE f32). Source id s is the s-th image of
    the folder's listing. UserError when a picture's grid is not its sample's (another folder or
    --resolution)."""
    from PIL import Image

    from fitscale.data.images import centre_crop, list_image_folder, resize_to_area  # lazy: heavy

    meta = read_meta(path)
    if meta.get("writer") != "from-images":
        raise UserError(
            f"{path}: written by `fitscale data {meta.get('writer')}`, not from-images; drop --images"
        )
    step = dataset_pixels_per_token(meta)
    inputs, _ = list_image_folder(images)
    table = read_sample_table(path, int(meta["num_samples"]))

    def pictures():
        for row in table:
            source_id = int(row[SOURCE_ID])
            if source_id >= len(inputs):
                raise UserError(
                    f"{images}: has {len(inputs)} images, fewer than {path} (source id {source_id})"
                )
            with Image.open(inputs[source_id][0]) as raw:
                image = raw.convert("RGB")
            full = resize_to_area(image, resolution, step)
            crop = centre_crop(image, resolution) if int(row[CROP_ROWS]) else None
            grids = [(full.height, full.width, int(row[ROWS]), int(row[COLS]))]
            if crop is not None:
                grids.append((crop.height, crop.width, int(row[CROP_ROWS]), int(row[CROP_COLS])))
            for height, width, rows, cols in grids:
                if (height // step, width // step) != (rows, cols):
                    raise UserError(
                        f"{inputs[source_id][0]}: prepared at --resolution {resolution} it is a "
                        f"{height // step}x{width // step} grid but sample {source_id} of "
                        f"{path} is {rows}x{cols}; pass the image folder and --resolution the dataset was written with"
                    )
            yield source_id, np.asarray(full), None if crop is None else np.asarray(crop)

    return write_pixels(path, pictures(), step, overwrite=overwrite, codec=codec)


def dataset_pixels_per_token(meta: dict) -> int:
    """Pixels of one latent token's side in a from-images dataset (its fitscale.json): the recorded
    autoencoder's downsampling times the dataset's patch size; 16 for datasets written before
    either was recorded (SD-VAE, 2 x 2 patches)."""
    downsample = (meta.get("vae") or {}).get("downsample", 8)
    return int(downsample) * int(meta.get("patch_size", 2))


PIXEL_PARTS = "pixel-parts"


def write_part_pixels(out: str | Path, first: int, items: list[tuple[int, bytes, bytes | None]]) -> None:
    """Keep the compressed pictures of one part of a `from-images --pixels` write (first source id
    `first`) in `OUT/pixel-parts/`, atomically; `merge_part_pixels` joins them once every part is
    written. Written before the part's latents are renamed into place, so a complete part always
    has its pixels and a rerun rewrites both."""
    import os

    folder = Path(out) / PIXEL_PARTS
    folder.mkdir(exist_ok=True)
    lengths = np.array([[len(full), len(crop or b"")] for _, full, crop in items], dtype=np.int64)
    data = np.frombuffer(b"".join(full + (crop or b"") for _, full, crop in items), dtype=np.uint8)
    final = folder / f"{first:012d}.npz"
    tmp = folder / f"{first:012d}.tmp.npz"
    np.savez(tmp, source_ids=np.array([i for i, _, _ in items], dtype=np.int64), lengths=lengths, data=data)
    os.replace(tmp, final)


def merge_part_pixels(out: str | Path, pixels_per_token: int, codec: str, source_ids: np.ndarray) -> dict:
    """Write the pixel side files of dataset `out` from its `pixel-parts/` (the same bytes as
    `write_image_pixels` would write from the image folder), then remove them; returns the meta.
    UserError when a sample of `source_ids` (the dataset's, in order) has no pictures there."""
    import shutil

    folder = Path(out) / PIXEL_PARTS
    pictures: dict[int, tuple[bytes, bytes | None]] = {}
    for part in sorted(folder.glob("*[0-9].npz")):
        with np.load(part) as stored:
            data, offset = stored["data"].tobytes(), 0
            for source_id, (full, crop) in zip(stored["source_ids"], stored["lengths"], strict=True):
                pictures[int(source_id)] = (
                    data[offset : offset + full],
                    data[offset + full : offset + full + crop] or None,
                )
                offset += full + crop
    missing = [int(i) for i in source_ids if int(i) not in pictures]
    if missing:
        raise UserError(
            f"{out}: no pixels for sample {missing[0]} ({len(missing)} samples without); write them with "
            f"`fitscale data pixels {out} --images ROOT --resolution S`"
        )
    meta = write_encoded_pixels(
        out, ((int(i), *pictures[int(i)]) for i in source_ids), pixels_per_token, codec=codec
    )
    shutil.rmtree(folder)
    return meta
