"""Image batches read in slices, never whole: an ADM `.npz` (`arr_0`, N x H x W x 3 uint8), a folder
of PNG/JPEG files, or a `fitscale sample` output folder (its `images/`).

Each source checks what it can before any feature is computed: the dtype (uint8), one size for
every picture, at least one picture. Errors are ValueError / FileNotFoundError naming the file.
"""

from __future__ import annotations

import json
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fitscale.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class NpzBatch:
    """`arr_0` of an ADM batch, read `read(start, stop)` at a time from the zip member (streamed)."""

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        if not self.path.is_file():
            raise FileNotFoundError(f"batch {self.path} does not exist")
        with self._member() as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                version, np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            self._offset = f.tell()
        if dtype != np.uint8:
            raise UserError(
                f"{self.path}: {key} is {dtype}, not uint8; ADM batches hold pictures as uint8 in [0, 255] "
                "(convert with (x * 255).round().clip(0, 255).astype(np.uint8) from floats in [0, 1])"
            )
        if fortran or len(shape) != 4 or shape[3] != 3:
            raise UserError(f"{self.path}: {key} has shape {shape}; expected (N, H, W, 3) in C order")
        if shape[0] < 1:
            raise UserError(f"{self.path}: {key} holds no pictures")
        self.count = int(shape[0])
        self.size = (int(shape[1]), int(shape[2]))
        self.source = str(self.path)

    @contextmanager
    def _member(self):
        with zipfile.ZipFile(self.path) as archive:
            name = f"{self.key}.npy"
            if name not in archive.namelist():
                raise UserError(
                    f"{self.path}: no `{self.key}` array (an ADM batch keeps its pictures in arr_0)"
                )
            with archive.open(name) as member:
                yield member

    def read(self, start: int, stop: int) -> np.ndarray:
        """Pictures [start, stop) as (n, H, W, 3) uint8."""
        per_image = self.size[0] * self.size[1] * 3
        with self._member() as f:
            f.seek(self._offset + start * per_image)
            data = f.read((stop - start) * per_image)
        return np.frombuffer(data, dtype=np.uint8).reshape(stop - start, *self.size, 3)


class FolderBatch:
    """Pictures of a folder (sorted by name) or of a `fitscale sample` output folder's `images/`."""

    def __init__(self, path: str | Path):
        from PIL import Image

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"batch {path} is neither an .npz file nor a folder of images")
        if (folder / "samples.json").is_file():  # a `fitscale sample` folder: the images its index names
            index = json.loads((folder / "samples.json").read_text())["images"]
            folder = folder / "images"
            self.files = [
                folder / f"{i['index']:06d}_class{i['label']}_{i['height']}x{i['width']}.png" for i in index
            ]
            for file in self.files:
                if not file.is_file():
                    raise FileNotFoundError(
                        f"{file} is missing: samples.json names it; sample again into that folder"
                    )
        else:
            self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UserError(f"{folder}: no .png/.jpg pictures")
        self.source = str(folder)
        self.count = len(self.files)
        first = None
        for file in self.files:  # headers only: cheap, and a bad picture fails before any feature
            with Image.open(file) as image:
                size = (image.height, image.width)
            if first is None:
                first = (file, size)
            elif size != first[1]:
                raise UserError(
                    f"{file}: {size[0]}x{size[1]} pixels, but {first[0].name} is {first[1][0]}x{first[1][1]}; "
                    "one batch holds one size: evaluate each size as its own batch"
                )
        self.size = first[1]

    def read(self, start: int, stop: int) -> np.ndarray:
        """Pictures [start, stop) as (n, H, W, 3) uint8 (converted to RGB)."""
        from PIL import Image

        pictures = []
        for file in self.files[start:stop]:
            with Image.open(file) as image:
                pictures.append(np.asarray(image.convert("RGB")))
        return np.stack(pictures)


def open_batch(path: str | Path):
    """The batch at `path`: NpzBatch for a `.npz`, FolderBatch for a folder."""
    return NpzBatch(path) if str(path).endswith(".npz") else FolderBatch(path)
