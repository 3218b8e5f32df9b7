"""`from-fit-latents`: the release's latent folders (one safetensors file per image) -> MDS.

The release sorts images by token count into `less_than_16`, `from_16_to_L`,
`greater_than_L_resize` and `greater_than_L_crop` (L = 256 or 1024). Each file holds `feature`
(2, h, w, 16) (the image and its horizontal flip in patch-grid layout), `grid`, `size`
(rows, cols) and `label`. An image over the limit appears in both `_resize` and `_crop` under
the same file name: it becomes one sample with a centre-crop variant. `less_than_16` files
are counted skips, as the release skips them in training.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fitscale.data.format import LatentSample
from fitscale.data.writer import SkipSample
from fitscale.errors import UserError

SMALL_FOLDER = "less_than_16"


def list_fit_latents(root: str | Path) -> tuple[list[tuple[str, str | None]], int]:
    """(main file, crop file or None) per image in a stable order, and the token limit L."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: release latent folder not found")
    limits = {int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"from_16_to_(\d+)", p.name))}
    limits |= {
        int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"greater_than_(\d+)_resize", p.name))
    }
    if len(limits) != 1:
        raise UserError(
            f"{root}: expected the release layout (from_16_to_L, greater_than_L_resize, greater_than_L_crop, "
            f"less_than_16) for one token limit L, found limits {sorted(limits) or 'none'}"
        )
    limit = limits.pop()
    inputs: list[tuple[str, str | None]] = []
    small = root / SMALL_FOLDER
    if small.is_dir():
        inputs += [(str(p), None) for p in sorted(small.glob("*.safetensors"))]
    normal = root / f"from_16_to_{limit}"
    if normal.is_dir():
        inputs += [(str(p), None) for p in sorted(normal.glob("*.safetensors"))]
    resize, crop = root / f"greater_than_{limit}_resize", root / f"greater_than_{limit}_crop"
    if resize.is_dir():
        for path in sorted(resize.glob("*.safetensors")):
            partner = crop / path.name
            inputs.append((str(path), str(partner) if partner.exists() else None))
    return inputs, limit


def read_release_file(path: str) -> tuple[np.ndarray, int, int, int]:
    """(tokens (2, rows*cols, D), rows, cols, label) of one release file."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except Exception as error:
        raise SkipSample("unreadable file", path, f"{type(error).__name__}: {error}") from error
    missing = {"feature", "size", "label"} - tensors.keys()
    if missing:
        raise SkipSample("missing tensors", path, ", ".join(sorted(missing)))
    feature = tensors["feature"]
    rows, cols = (int(v) for v in np.asarray(tensors["size"]).reshape(-1)[:2])
    if feature.ndim != 4 or feature.shape[1:3] != (rows, cols):
        raise SkipSample(
            "bad grid", path, f"feature {tuple(feature.shape)} does not match size ({rows}, {cols})"
        )
    tokens = feature.reshape(feature.shape[0], rows * cols, feature.shape[3])
    return tokens, rows, cols, int(np.asarray(tensors["label"]).reshape(-1)[0])


def build_from_fit_latents(dtype: str | None):
    """The part builder of `from-fit-latents`: yields a LatentSample per (file, crop file) input, or a
    SkipSample for `less_than_16` files and unreadable ones; tokens cast to `dtype` when given.
    """

    def build(inputs: Sequence[tuple[str, str | None]], first: int) -> Iterator[LatentSample | SkipSample]:
        for offset, (path, crop_path) in enumerate(inputs):
            if Path(path).parent.name == SMALL_FOLDER:
                yield SkipSample("under token minimum", path, f"in {SMALL_FOLDER}")
                continue
            try:
                tokens, rows, cols, label = read_release_file(path)
                sample = LatentSample(tokens, rows, cols, label, source_id=first + offset, source=path)
                if crop_path is not None:
                    sample.crop, sample.crop_rows, sample.crop_cols, _ = read_release_file(crop_path)
            except SkipSample as skip:
                yield skip
                continue
            if dtype is not None:
                sample.tokens = sample.tokens.astype(dtype)
                sample.crop = None if sample.crop is None else sample.crop.astype(dtype)
            yield sample

    return build
