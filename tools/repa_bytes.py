"""Bytes per image of REPA's encoder input stored beside the latents: compressed pixels against
precomputed encoder features (docs/repa.md, "Pixels or features").

    python tools/repa_bytes.py [--size 224] [--tokens 16] [--dim 768]

Pixels: scikit-image's natural sample photographs, centre-cropped square and resized to the
encoder's input for a 16x16-token latent (224 px for DINOv2-B's 14-pixel patches; 256 px is the
image itself), encoded losslessly (PNG) and lossily (WebP, JPEG). Features: tokens^2 x dim values
in fp16, once per stored variant (the flip doubles them; pixels are flipped at load time).
"""

from __future__ import annotations

import argparse
import io
import statistics

import numpy as np
from PIL import Image

SAMPLES = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "colorwheel")


def encoded_sizes(image: Image.Image) -> dict[str, int]:
    """Bytes of `image` as PNG, WebP q90 / lossless and JPEG q95 / q90."""
    sizes = {}
    for name, options in (
        ("png", {"format": "PNG", "optimize": True}),
        ("webp lossless", {"format": "WEBP", "lossless": True}),
        ("webp q90", {"format": "WEBP", "quality": 90}),
        ("jpeg q95", {"format": "JPEG", "quality": 95}),
        ("jpeg q90", {"format": "JPEG", "quality": 90}),
    ):
        buffer = io.BytesIO()
        image.save(buffer, **options)
        sizes[name] = buffer.tell()
    return sizes


def main() -> None:
    from skimage import data

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="pixels a side given to the encoder")
    parser.add_argument("--tokens", type=int, default=16, help="latent tokens a side")
    parser.add_argument("--dim", type=int, default=768, help="encoder feature width (DINOv2-B: 768)")
    args = parser.parse_args()
    rows: dict[str, list[int]] = {}
    for name in SAMPLES:
        array = getattr(data, name)()
        array = np.stack([array] * 3, -1) if array.ndim == 2 else array[..., :3]
        side = min(array.shape[:2])
        top, left = (array.shape[0] - side) // 2, (array.shape[1] - side) // 2
        image = Image.fromarray(array[top : top + side, left : left + side]).resize(
            (args.size, args.size), Image.BICUBIC
        )
        for codec, size in encoded_sizes(image).items():
            rows.setdefault(codec, []).append(size)
    features = args.tokens**2 * args.dim * 2
    print(
        f"| stored per image ({len(SAMPLES)} photographs, {args.size}x{args.size}) | median bytes | min | max |"
    )
    print("|---|---|---|---|")
    for codec, sizes in rows.items():
        print(f"| pixels, {codec} | {statistics.median(sizes):,.0f} | {min(sizes):,} | {max(sizes):,} |")
    print(
        f"| features, {args.tokens}x{args.tokens} tokens x {args.dim} fp16, one variant | {features:,} | | |"
    )
    print(f"| features with the flipped variant | {2 * features:,} | | |")


if __name__ == "__main__":
    main()
