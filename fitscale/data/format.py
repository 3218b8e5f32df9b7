"""The on-disk latent dataset: MDS shards plus a small per-sample table.

A dataset folder written by `fitscale data ...` holds
- `index.json` and MDS shards (MosaicML Streaming), one sample per image with the columns of
  `MDS_COLUMNS`: `tokens` (V, rows*cols, p*p*C) in the latent dtype, V = 2 when the horizontally
  flipped variant is stored (index 1); `crop` the same for the optional centre-crop variant
  (a one-element placeholder when absent: crop_rows = crop_cols = 0); grid sizes, label and a stable source id and name.
- `samples.npy`: int64 (N, 7) with the columns of `SAMPLE_COLUMNS`, in the dataset's global
  sample order. The loader plans whole epochs (which image goes to which rank and micro-batch)
  from this table alone, so planning never touches the shards.
- `fitscale.json`: format, token layout, dtype, token limit, counts of skipped inputs. It is
  written last: a folder without it is an unfinished write.

Token layout (shared with the model): an image of h x w latent pixels is (h/p)*(w/p) tokens in
row-major order, each holding p*p*C values ordered (channel, row-in-patch, col-in-patch).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fitscale.errors import UserError

FORMAT_NAME = "fitscale-latents"
FORMAT_VERSION = 1
PATCH_SIZE = 2
LATENT_CHANNELS = 4
TOKEN_DIM = PATCH_SIZE * PATCH_SIZE * LATENT_CHANNELS

MDS_COLUMNS = {
    "tokens": "ndarray",
    "crop": "ndarray",
    "rows": "int",
    "cols": "int",
    "crop_rows": "int",
    "crop_cols": "int",
    "label": "int",
    "source_id": "int",
    "source": "str",
}
SAMPLE_COLUMNS = ("rows", "cols", "crop_rows", "crop_cols", "label", "has_flip", "source_id")
ROWS, COLS, CROP_ROWS, CROP_COLS, LABEL, HAS_FLIP, SOURCE_ID = range(len(SAMPLE_COLUMNS))

META_FILE = "fitscale.json"
SAMPLES_FILE = "samples.npy"
INDEX_FILE = "index.json"


@dataclass
class LatentSample:
    """One image as stored: its tokens (and flipped / centre-crop variants) and identity."""

    tokens: np.ndarray  # (V, rows*cols, token_dim); V = 2 holds the horizontal flip at index 1
    rows: int
    cols: int
    label: int
    source_id: int
    source: str
    crop: np.ndarray | None = None  # (V, crop_rows*crop_cols, token_dim) or None
    crop_rows: int = 0
    crop_cols: int = 0

    def to_mds(self) -> dict:
        """The sample as one MDS record (the columns of MDS_COLUMNS; an absent crop as a 1-element
        placeholder).
        """
        absent = np.zeros((1,), dtype=self.tokens.dtype)  # MDS cannot store an empty array
        return {
            "tokens": np.ascontiguousarray(self.tokens),
            "crop": absent if self.crop is None else np.ascontiguousarray(self.crop),
            "rows": int(self.rows),
            "cols": int(self.cols),
            "crop_rows": int(self.crop_rows),
            "crop_cols": int(self.crop_cols),
            "label": int(self.label),
            "source_id": int(self.source_id),
            "source": str(self.source),
        }

    def table_row(self) -> list[int]:
        """Its row of the per-sample table `samples.npy`, in SAMPLE_COLUMNS order."""
        has_flip = int(self.tokens.shape[0] > 1)
        return [self.rows, self.cols, self.crop_rows, self.crop_cols, self.label, has_flip, self.source_id]


def token_dim_of(meta: dict) -> int:
    """Values per token of a dataset (its fitscale.json): p * p * C, 16 for SD-VAE latents."""
    return int(meta.get("token_dim", TOKEN_DIM))


def patchify(latent: np.ndarray, patch_size: int = PATCH_SIZE) -> np.ndarray:
    """(C, H, W) latent -> (H/p * W/p, C*p*p) tokens, row-major, values (channel, row, col)."""
    channels, height, width = latent.shape
    if height % patch_size or width % patch_size:
        raise UserError(f"latent of {height}x{width} is not a multiple of the patch size {patch_size}")
    rows, cols = height // patch_size, width // patch_size
    grid = latent.reshape(channels, rows, patch_size, cols, patch_size)
    return grid.transpose(1, 3, 0, 2, 4).reshape(rows * cols, channels * patch_size * patch_size)


def unpatchify(tokens: np.ndarray, rows: int, cols: int, channels: int = LATENT_CHANNELS) -> np.ndarray:
    """Inverse of `patchify`: (rows*cols, C*p*p) -> (C, rows*p, cols*p)."""
    patch_size = int(round((tokens.shape[1] // channels) ** 0.5))
    grid = tokens.reshape(rows, cols, channels, patch_size, patch_size)
    return grid.transpose(2, 0, 3, 1, 4).reshape(channels, rows * patch_size, cols * patch_size)


def tokens_with_flip(latent: np.ndarray) -> np.ndarray:
    """(C, H, W) latent -> (2, T, token_dim): the image's tokens and those of its horizontal flip."""
    return np.stack([patchify(latent), patchify(latent[:, :, ::-1])])


def read_meta(folder: str | os.PathLike) -> dict:
    """The dataset's `fitscale.json`, with errors that say what is wrong with the folder."""
    folder = Path(folder)
    meta_path = folder / META_FILE
    if not meta_path.exists():
        if (folder / "writer.json").exists():
            raise FileNotFoundError(
                f"{folder}: the dataset write is unfinished ({META_FILE} missing); rerun the same "
                "`fitscale data ...` command to finish it"
            )
        raise FileNotFoundError(
            f"{folder}: not a fitscale latent dataset ({META_FILE} missing); write one with "
            "`fitscale data synth|digits|from-images|from-fit-latents`"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise UserError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {FORMAT_NAME!r} version {FORMAT_VERSION}"
        )
    return meta


def read_sample_table(folder: str | os.PathLike, num_samples: int) -> np.ndarray:
    """samples.npy as int64 (N, 7), checked against the sample count of the index."""
    path = Path(folder) / SAMPLES_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing sample table; rewrite the dataset")
    table = np.load(path, allow_pickle=False)
    if table.ndim != 2 or table.shape[1] != len(SAMPLE_COLUMNS) or table.shape[0] != num_samples:
        raise UserError(
            f"{path}: table of shape {tuple(table.shape)} does not match the {num_samples} samples of "
            f"{INDEX_FILE} (expected ({num_samples}, {len(SAMPLE_COLUMNS)})); rewrite the dataset"
        )
    return table.astype(np.int64, copy=False)


def read_index(folder: str | os.PathLike) -> dict:
    """The MDS `index.json` of a dataset folder, parsed.

    Raises FileNotFoundError when it is missing and ValueError when it is not valid JSON.
    """
    path = Path(folder) / INDEX_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: missing MDS index; the dataset is incomplete, rewrite it or restore {INDEX_FILE}"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: corrupt MDS index ({error}); rewrite the dataset") from error


def shard_files(index: dict) -> list[tuple[str, int]]:
    """(basename, bytes) of every stored shard file (the compressed one when compressed)."""
    files = []
    for shard in index["shards"]:
        stored = shard.get("zip_data") or shard["raw_data"]
        files.append((stored["basename"], int(stored["bytes"])))
    return files


def check_local_shards(folder: str | os.PathLike) -> int:
    """Every shard named by the index exists with its recorded size; returns the sample count.

    A truncated or missing shard is named here, before training starts, instead of failing
    somewhere inside a worker hours later.
    """
    folder = Path(folder)
    index = read_index(folder)
    for basename, expected in shard_files(index):
        path = folder / basename
        if not path.exists():
            raise FileNotFoundError(f"shard {path} named by {folder / INDEX_FILE} is missing")
        size = path.stat().st_size
        if size != expected:
            raise UserError(
                f"shard {path} is truncated or corrupt: {size} bytes, the index records {expected}; "
                "rewrite the dataset (or restore the shard)"
            )
    return sum(int(shard["samples"]) for shard in index["shards"])


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so that readers see either the old or the complete new content."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save `array` to `path` through a temporary file and a rename, so readers never see a partial file."""
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Bytes counterpart of `atomic_write_text`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
