"""FID of generated pictures against a reference set, with torchmetrics' Inception (never downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fitscale.errors import UserError

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception


def default_inception_weights() -> Path:
    """Where torch's hub cache would hold torch-fidelity's Inception weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


def load_reference_images(path: str | Path) -> np.ndarray:
    """uint8 NHWC pictures from an ADM reference batch (.npz with `arr_0`) or a folder of PNG/JPEG files.

    Raises FileNotFoundError / ValueError naming the path."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            if "arr_0" not in data:
                raise UserError(f"{path}: no `arr_0` array; an ADM reference batch holds the images there")
            return data["arr_0"]
    if path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if not files:
            raise UserError(f"{path}: no .png/.jpg images")
        return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    raise FileNotFoundError(f"FID reference {path} is neither an .npz file nor a folder of images")


def compute_fid(
    generated: list[np.ndarray] | np.ndarray,
    reference: np.ndarray,
    inception_weights: str | Path | None = None,
    feature_extractor: torch.nn.Module | None = None,
    batch_size: int = 64,
) -> float:
    """FID between uint8 pictures (any sizes; resized to 299 by the metric) with torchmetrics.

    The Inception weights are never downloaded: give `inception_weights` (torch-fidelity's
    file) or place it in torch's hub cache. `feature_extractor` replaces Inception (tests).
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:
        raise ImportError(
            "FID needs torchmetrics and torch-fidelity: pip install 'fitscale[sample]'"
        ) from error
    if feature_extractor is None:
        weights = Path(inception_weights) if inception_weights else default_inception_weights()
        if not weights.is_file():
            raise FileNotFoundError(
                f"Inception weights {weights} not found; FID needs torch-fidelity's {INCEPTION_WEIGHTS_FILE} "
                "on local disk: pass --inception-weights PATH (nothing is downloaded)"
            )
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    else:
        metric = FrechetInceptionDistance(feature=feature_extractor)
    for real, pictures in ((True, reference), (False, generated)):
        for picture in pictures if not isinstance(pictures, np.ndarray) else list(pictures):
            metric.update(torch.from_numpy(np.ascontiguousarray(picture)).permute(2, 0, 1)[None], real=real)
    return float(metric.compute())
