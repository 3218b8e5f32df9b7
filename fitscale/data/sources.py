"""Built-in datasets: synthetic latents for scale tests and rendered handwritten digits.

`synth` mimics the size mix of real data written at a token limit: about half the images are
larger than the limit and come out at (nearly) the full token count with their aspect ratio,
each with a centre-crop variant like the release's `greater_than_*_crop`; the others spread
log-uniformly down to 16 tokens. `digits` renders scikit-learn's 1,797 handwritten 8x8 digits
(real data shipped with the package) as 4-channel latents at several sizes and aspect ratios,
so a tiny model can learn recognisable classes in minutes on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np

from fitscale.data.format import LATENT_CHANNELS, PATCH_SIZE, LatentSample, patchify, tokens_with_flip

# (width / height, weight): a rough mix of photo aspect ratios, square most common.
ASPECT_RATIOS = (
    (1.0, 0.35),
    (4 / 3, 0.2),
    (3 / 4, 0.15),
    (3 / 2, 0.1),
    (2 / 3, 0.08),
    (16 / 9, 0.07),
    (9 / 16, 0.05),
)


def grid_for(area: float, aspect: float, max_tokens: int, min_tokens: int = 16) -> tuple[int, int]:
    """Patch grid (rows, cols) near `area` tokens with cols/rows near `aspect`, within the limits."""
    rows = max(1, int(math.sqrt(area / aspect)))
    cols = max(1, int(rows * aspect))
    while rows * cols > max_tokens:
        if cols >= rows:
            cols -= 1
        else:
            rows -= 1
    while rows * cols < min_tokens:
        rows, cols = rows + 1, cols + 1
    return rows, cols


def synth_sample(index: int, seed: int, max_tokens: int, num_classes: int, dtype: str) -> LatentSample:
    """One synthetic image, reproducible from (seed, index): an aspect ratio from a realistic mix, half
    at the token limit, the rest of log-uniform area; standard-normal latents with their flip, and
    a centre-crop variant for non-square images at the limit.
    """
    rng = np.random.default_rng([seed, index])
    ratios, weights = zip(*ASPECT_RATIOS)
    aspect = float(rng.choice(ratios, p=np.asarray(weights) / sum(weights)))
    over_limit = rng.random() < 0.5
    area = max_tokens if over_limit else math.exp(rng.uniform(math.log(16), math.log(max_tokens)))
    rows, cols = grid_for(area, aspect, max_tokens)
    latent = rng.standard_normal((LATENT_CHANNELS, rows * PATCH_SIZE, cols * PATCH_SIZE)).astype(dtype)
    sample = LatentSample(
        tokens=tokens_with_flip(latent),
        rows=rows,
        cols=cols,
        label=int(rng.integers(num_classes)),
        source_id=index,
        source=f"synth:{index}",
    )
    if over_limit and rows != cols:
        side = math.isqrt(max_tokens)
        top, left = (rows - min(rows, side)) // 2, (cols - min(cols, side)) // 2
        crop_rows, crop_cols = min(rows, side), min(cols, side)
        crop = latent[:, top * 2 : (top + crop_rows) * 2, left * 2 : (left + crop_cols) * 2]
        sample.crop, sample.crop_rows, sample.crop_cols = tokens_with_flip(crop), crop_rows, crop_cols
    return sample


def build_synth(seed: int, max_tokens: int, num_classes: int, dtype: str):
    """The part builder of `fitscale data synth`: `synth_sample` for each index."""

    def build(indices: Sequence[int], first: int) -> Iterator[LatentSample]:
        for index in indices:
            yield synth_sample(int(index), seed, max_tokens, num_classes, dtype)

    return build


def digit_canvas(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """An 8x8 digit (values 0..16) as float32 ink in [0, 1] on a (height, width) canvas: scaled
    (bilinear) to the canvas's shorter side, centred, aspect kept."""
    from PIL import Image

    side = min(height, width)
    ink = Image.fromarray((image / 16.0).astype(np.float32)).resize((side, side), Image.BILINEAR)
    canvas = np.zeros((height, width), np.float32)
    top, left = (height - side) // 2, (width - side) // 2
    canvas[top : top + side, left : left + side] = np.clip(np.asarray(ink), 0.0, 1.0)
    return canvas


def render_digit(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """An 8x8 digit (values 0..16) -> (4, 2*rows, 2*cols) latent, the digit centred, aspect kept.

    Channel 0 is the picture itself (ink 1 -> +1, background -> -1), so `latent[0]` is a
    viewable image; the other channels are a blurred copy and two signed variants, giving the
    model a little structure across channels to learn.
    """
    from scipy.ndimage import gaussian_filter

    canvas = digit_canvas(image, rows * PATCH_SIZE, cols * PATCH_SIZE)
    blurred = gaussian_filter(canvas, sigma=1.0)
    picture = 2.0 * canvas - 1.0
    return np.stack([picture, 2.0 * blurred - 1.0, 0.5 * picture, -0.5 * picture]).astype(np.float32)


def build_digits(seed: int, dtype: str, min_side: int = 4, max_side: int = 16):
    """Inputs are (digit index, variant) pairs; each variant draws its own grid size and aspect."""
    from sklearn.datasets import load_digits

    digits = load_digits()

    def build(pairs: Sequence[tuple[int, int]], first: int) -> Iterator[LatentSample]:
        for offset, (digit, variant) in enumerate(pairs):
            rng = np.random.default_rng([seed, digit, variant])
            rows, cols = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            latent = render_digit(digits.images[digit], rows, cols).astype(dtype)
            yield LatentSample(
                tokens=patchify(latent)[None],  # no flip: a mirrored digit is not a digit
                rows=rows,
                cols=cols,
                label=int(digits.target[digit]),
                source_id=first + offset,
                source=f"digits:{digit}:{variant}",
            )

    return build, len(digits.images)
