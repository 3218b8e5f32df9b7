"""ADM reference batches: reading their stored statistics, and building our own from an image folder.

An ADM reference `.npz` holds `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial
features) of the whole training set, and `arr_0`: 10,000 of its pictures (uint8 NHWC), whose
features precision and recall use. FID and sFID compare with the stored statistics, never with
statistics of `arr_0` (ADM's `read_statistics`): a reference without them gives numbers that do
not compare with published ones, so it is refused unless asked for, and then labelled.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fitscale.errors import UserError
from fitscale.eval.adm import FIDStatistics
from fitscale.eval.batches import IMAGE_SUFFIXES

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
REFERENCE_IMAGES = 10000  # the pictures an ADM reference batch keeps in arr_0
NONSQUARE_RECIPES = ("crop", "area")


def stored_statistics(path: Path) -> tuple[FIDStatistics, FIDStatistics] | None:
    """(pool, spatial) statistics stored in the reference batch, or None when it has none.
    ValueError naming the file and the key when only some are there."""
    with zipfile.ZipFile(path) as archive:
        names = {name.removesuffix(".npy") for name in archive.namelist()}
    present = [key for key in STAT_KEYS if key in names]
    if not present:
        return None
    if len(present) != len(STAT_KEYS):
        missing = [key for key in STAT_KEYS if key not in names]
        raise UserError(f"{path}: has {', '.join(present)} but no {', '.join(missing)}; rebuild it")
    with np.load(path) as data:
        return FIDStatistics(data["mu"], data["sigma"]), FIDStatistics(data["mu_s"], data["sigma_s"])


def center_crop_arr(image, image_size: int) -> np.ndarray:
    """guided-diffusion's `image_datasets.center_crop_arr`: halve with BOX while the short side is
    >= 2 * size, resize with BICUBIC so the short side is `size`, centre-crop to size x size."""
    from PIL import Image

    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size]


def resize_picture(image, height: int, width: int, recipe: str = "crop") -> np.ndarray:
    """An RGB PIL image as (height, width, 3) uint8. Square: ADM's `center_crop_arr`. Non-square:
    `crop` = the same recipe generalised (BOX halving while both sides stay >= 2x the target,
    BICUBIC resize so the picture covers height x width with its aspect kept, centre crop);
    `area` = BICUBIC resize straight to height x width (aspect changed, nothing cut)."""
    from PIL import Image

    if recipe not in NONSQUARE_RECIPES:
        raise UserError(f"--recipe {recipe!r}: use one of {', '.join(NONSQUARE_RECIPES)}")
    image = image.convert("RGB")
    if height == width:
        return center_crop_arr(image, height)
    if recipe == "area":
        return np.array(image.resize((width, height), resample=Image.BICUBIC))
    while image.width >= 2 * width and image.height >= 2 * height:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.BOX)
    scale = max(height / image.height, width / image.width)
    new = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    arr = np.array(image.resize(new, resample=Image.BICUBIC))
    top, left = (arr.shape[0] - height) // 2, (arr.shape[1] - width) // 2
    return arr[top : top + height, left : left + width]


class ResizedFolder:
    """The pictures of a folder tree (sorted paths, every sub-folder) resized to height x width by
    `resize_picture`, read in slices like eval.batches sources."""

    def __init__(self, folder: str | Path, height: int, width: int, recipe: str = "crop"):

        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        if recipe not in NONSQUARE_RECIPES:
            raise UserError(f"--recipe {recipe!r}: use one of {', '.join(NONSQUARE_RECIPES)}")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UserError(f"{root}: no .png/.jpg pictures in it or below it")
        self.count, self.size, self.recipe, self.source = len(self.files), (height, width), recipe, str(root)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Pictures [start, stop) as (n, height, width, 3) uint8."""
        from PIL import Image

        out = []
        for file in self.files[start:stop]:
            with Image.open(file) as image:
                out.append(resize_picture(image, *self.size, self.recipe))
        return np.stack(out)


def write_reference(
    out: Path, source: ResizedFolder, pool: FIDStatistics, spatial: FIDStatistics, seed: int = 0
) -> int:
    """Write an ADM reference batch: the whole set's statistics and `arr_0`, 10,000 pictures drawn
    without replacement by `seed` (all of them for a smaller set), in index order, streamed one
    picture at a time through a temporary file and a rename. Returns the pictures in arr_0."""
    count = min(REFERENCE_IMAGES, source.count)
    chosen = np.sort(np.random.default_rng(seed).choice(source.count, count, replace=False))
    out.parent.mkdir(parents=True, exist_ok=True)  # a new folder of references (was: a missing .tmp error)
    tmp = out.with_name(out.name + ".tmp")
    height, width = source.size
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in (
            ("mu", pool.mu),
            ("sigma", pool.sigma),
            ("mu_s", spatial.mu),
            ("sigma_s", spatial.sigma),
        ):
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(value, dtype=np.float64))
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            header = {"descr": "|u1", "fortran_order": False, "shape": (count, height, width, 3)}
            np.lib.format.write_array_header_2_0(member, header)
            for index in chosen:
                member.write(source.read(int(index), int(index) + 1).tobytes())
    tmp.replace(out)
    return count
