"""Decode and resize throughput of `fitscale data from-images`, per CPU core.

Runs `fitscale.data.images.prepare_image` (open, decode to RGB, area resize to at most S*S
pixels, floor to whole tokens, centre crop when both sides exceed S) in one process over photos
of ImageNet-like sizes (scikit-image's sample photos, 300x451 to 872x1000 pixels,
written as JPEG quality 90 and as PNG), and reports images per second of CPU time (one core;
`--workers N` decode workers scale it by about N when N cores are free). `native` keeps every
image at its own size (only floored to whole tokens).

    python tools/bench_encode.py --repeat 20
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "hubble_deep_field.jpg",
)


def photo_files(folder: Path) -> list[str]:
    """The sample photos written as JPEG (quality 90) and PNG into `folder`."""
    import skimage
    from PIL import Image

    files = []
    for name in PHOTOS:
        source = Path(skimage.data_dir) / name
        if not source.exists():
            continue
        image = Image.open(source).convert("RGB")
        for suffix in ("jpg", "png"):
            path = folder / f"{source.stem}.{suffix}"
            image.save(path, quality=90) if suffix == "jpg" else image.save(path)
            files.append(str(path))
    return files


def rate(files: list[str], resolution: int, repeat: int) -> dict:
    """Images per CPU-second of prepare_image at `resolution` (a huge one for native)."""
    from fitscale.data.images import prepare_image

    jobs = [(path, resolution, 16, None) for path in files] * repeat
    cpu, wall = time.process_time(), time.perf_counter()
    for job in jobs:
        prepare_image(job)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"images": len(jobs), "images_per_cpu_s": len(jobs) / cpu, "images_per_wall_s": len(jobs) / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="passes over the photos")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        files = photo_files(Path(folder))
        results = {
            name: rate(files, size, args.repeat)
            for name, size in (("256", 256), ("512", 512), ("native", 1 << 16))
        }
    print(json.dumps({"photos": len(files), **results}, indent=1))


if __name__ == "__main__":
    main()
