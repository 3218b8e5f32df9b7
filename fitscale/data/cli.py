"""`fitscale data synth|digits|from-images|from-fit-latents|stats`."""

from __future__ import annotations

import argparse
import json


def _add_write_options(parser: argparse.ArgumentParser, dtype_default: str | None = "float16") -> None:
    parser.add_argument("out", help="dataset folder to write (resumed if an unfinished write is there)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--dtype", default=dtype_default, help="stored latent dtype")
    parser.add_argument("--part-size", type=int, default=4096, help="images per resumable part")
    parser.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the dataset metadata as JSON")


def _settings(args, writer: str, max_tokens: int, **options):
    from fitscale.data.writer import WriteSettings

    if args.part_size < 1:
        raise ValueError(f"--part-size {args.part_size}: must be at least 1")
    return WriteSettings(
        writer=writer,
        max_image_tokens=max_tokens,
        num_classes=args.num_classes,
        part_size=args.part_size,
        compression=args.compression,
        options={"dtype": args.dtype, **options},
    )


def _finish(args, meta: dict | None) -> int:
    if meta is None:
        print(f"{args.out}: this rank's parts are written; the last rank to finish merges the index")
    elif args.json:
        print(json.dumps(meta, indent=1))
    else:
        skipped = ", ".join(f"{k}: {v}" for k, v in meta["skipped"].items()) or "none"
        print(f"{args.out}: {meta['num_samples']} images written, skipped {meta['num_skipped']} ({skipped})")
    return 0


def run_synth(args) -> int:
    """`fitscale data synth`: write synthetic latents (ValueError unless --max-tokens is 256 or 1024);
    exit status.
    """
    from fitscale.data.sources import build_synth
    from fitscale.data.writer import write_dataset

    if args.max_tokens not in (256, 1024):
        raise ValueError(f"--max-tokens {args.max_tokens}: use 256 or 1024")
    settings = _settings(args, "synth", args.max_tokens, seed=args.seed, num_images=args.num_images)
    build = build_synth(args.seed, args.max_tokens, args.num_classes, args.dtype)
    meta = write_dataset(
        args.out,
        range(args.num_images),
        build,
        settings,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return _finish(args, meta)


def run_digits(args) -> int:
    """`fitscale data digits`: write scikit-learn's handwritten digits as 10-class latents; exit status.

    Raises ValueError unless 1 <= --min-side <= --max-side <= 16 (grid sides in tokens).
    """
    from fitscale.data.sources import build_digits
    from fitscale.data.writer import write_dataset

    args.num_classes = 10
    if not 1 <= args.min_side <= args.max_side <= 16:
        raise ValueError(
            f"--min-side {args.min_side} --max-side {args.max_side}: grid sides in tokens must satisfy "
            "1 <= min-side <= max-side <= 16 (the 256-token limit)"
        )
    build, count = build_digits(args.seed, args.dtype, args.min_side, args.max_side)
    inputs = [(digit, variant) for variant in range(args.variants) for digit in range(count)]
    settings = _settings(
        args,
        "digits",
        256,
        seed=args.seed,
        variants=args.variants,
        min_side=args.min_side,
        max_side=args.max_side,
    )
    meta = write_dataset(
        args.out,
        inputs,
        build,
        settings,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        extra_meta={
            "classes": [str(d) for d in range(10)],
            "preview_channel": 0,
            "grid_sides": [args.min_side, args.max_side],
        },
    )
    from fitscale.data.pixels import write_digit_pixels

    write_digit_pixels(args.out, overwrite=True)  # beside the latents just written (the REPA encoder's input)
    return _finish(args, meta)


def run_pixels(args) -> int:
    """`fitscale data pixels DIR [--images ROOT --resolution S]`: add the pixel side files
    (fitscale.data.pixels) to a digits dataset, or to a from-images dataset from its image folder."""
    from fitscale.data.pixels import write_digit_pixels, write_image_pixels

    if args.images is not None:
        meta = write_image_pixels(args.path, args.images, args.resolution, args.overwrite, args.codec)
    else:
        meta = write_digit_pixels(
            args.path, args.pixels_per_token, overwrite=args.overwrite, codec=args.codec
        )
    print(
        f"{args.path}: pixels of {meta['images']} images written ({meta['bytes'] / max(meta['images'], 1):.0f} bytes each)"
    )
    return 0


def run_from_images(args) -> int:
    """`fitscale data from-images`: encode an ImageFolder with a local diffusers VAE; exit status.

    Raises ValueError for a --resolution not a multiple of 16 of at least 64, more class folders than
    --num-classes, or a VAE folder that cannot be used (fitscale.data.vae).
    """
    from fitscale.data.format import LATENT_CHANNELS
    from fitscale.data.images import build_from_images, list_image_folder
    from fitscale.data.vae import LatentNormalisation, check_vae_folder
    from fitscale.data.writer import write_dataset

    if args.resolution % 16 or args.resolution < 64:
        raise ValueError(f"--resolution {args.resolution}: use a multiple of 16 of at least 64 (256 or 512)")
    inputs, classes = list_image_folder(args.images)
    if len(classes) > args.num_classes:
        raise ValueError(f"{args.images}: {len(classes)} class folders but --num-classes {args.num_classes}")
    max_tokens = (args.resolution // 16) ** 2
    latents = LatentNormalisation.from_config(
        check_vae_folder(args.vae, LATENT_CHANNELS), f"--vae {args.vae}"
    )
    settings = _settings(
        args,
        "from-images",
        max_tokens,
        resolution=args.resolution,
        vae=str(args.vae),
        vae_latents=latents.as_dict(),
    )
    build = build_from_images(args.vae, args.resolution, args.batch_size, args.dtype, args.device)
    meta = write_dataset(
        args.out,
        inputs,
        build,
        settings,
        overwrite=args.overwrite,
        rank=args.rank,
        world_size=args.world_size,
        extra_meta={"classes": classes, "vae": {"path": str(args.vae), **latents.as_dict()}},
        progress=not args.no_progress,
    )
    return _finish(args, meta)


def run_from_fit_latents(args) -> int:
    """`fitscale data from-fit-latents`: convert the release's per-image latent files to MDS; exit status."""
    from fitscale.data.fit_latents import build_from_fit_latents, list_fit_latents
    from fitscale.data.writer import write_dataset

    inputs, limit = list_fit_latents(args.source)
    settings = _settings(args, "from-fit-latents", limit, source=str(args.source))
    meta = write_dataset(
        args.out,
        inputs,
        build_from_fit_latents(args.dtype),
        settings,
        overwrite=args.overwrite,
        rank=args.rank,
        world_size=args.world_size,
        progress=not args.no_progress,
    )
    return _finish(args, meta)


def run_stats(args) -> int:
    """`fitscale data stats`: print a dataset's statistics (or JSON); exit status 1 when `--verify`
    finds problems.
    """
    from fitscale.data.stats import dataset_stats, format_stats

    stats = dataset_stats(args.path, args.token_budget, verify=args.verify)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 1 if stats.get("problems") else 0


def register(subparsers) -> None:
    """Add `fitscale data` and its subcommands (synth, digits, from-images, from-fit-latents, pixels, stats) to
    `subparsers`.
    """
    data = subparsers.add_parser("data", help="write and inspect latent datasets")
    commands = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    synth = commands.add_parser("synth", help="synthetic latents with a realistic mix of sizes")
    _add_write_options(synth)
    synth.add_argument("--num-images", type=int, default=10000)
    synth.add_argument("--max-tokens", type=int, default=256, help="token limit: 256 or 1024")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=run_synth)

    digits = commands.add_parser("digits", help="scikit-learn's handwritten digits as small latents")
    _add_write_options(digits, dtype_default="float32")
    digits.add_argument("--variants", type=int, default=4, help="renderings (size, aspect) per digit")
    digits.add_argument("--seed", type=int, default=0)
    digits.add_argument(
        "--min-side", type=int, default=4, help="smallest grid side in tokens (2 px of latent each)"
    )
    digits.add_argument("--max-side", type=int, default=16, help="largest grid side in tokens")
    digits.set_defaults(func=run_digits)

    images = commands.add_parser("from-images", help="encode an ImageFolder with a diffusers AutoencoderKL")
    images.add_argument("images", help="ImageFolder root: one subfolder per class")
    _add_write_options(images)
    images.add_argument("--vae", required=True, help="local folder of an AutoencoderKL (save_pretrained)")
    images.add_argument("--resolution", type=int, default=256, help="S: at most S*S pixels per image")
    images.add_argument("--batch-size", type=int, default=32)
    images.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    images.add_argument("--rank", type=int, default=0, help="this process's share of a split write")
    images.add_argument("--world-size", type=int, default=1)
    images.set_defaults(func=run_from_images)

    release = commands.add_parser("from-fit-latents", help="convert the release's latent folders")
    release.add_argument("source", help="folder holding from_16_to_L, greater_than_L_resize, ...")
    _add_write_options(release, dtype_default=None)
    release.add_argument("--rank", type=int, default=0)
    release.add_argument("--world-size", type=int, default=1)
    release.set_defaults(func=run_from_fit_latents)

    pixels = commands.add_parser("pixels", help="add the pixels an alignment encoder (train.repa) reads")
    pixels.add_argument("path", help="dataset folder (digits or from-images)")
    pixels.add_argument(
        "--images", default=None, help="from-images datasets: the image folder they were written from"
    )
    pixels.add_argument(
        "--resolution", type=int, default=256, help="from-images: the --resolution written with"
    )
    pixels.add_argument(
        "--pixels-per-token", type=int, default=8, help="digits: pixels of a latent token's side"
    )
    pixels.add_argument("--codec", choices=("png", "jpeg", "webp"), default="png", help="png is lossless")
    pixels.add_argument("--overwrite", action="store_true", help="replace pixels already there")
    pixels.set_defaults(func=run_pixels)

    stats = commands.add_parser("stats", help="image count, token histogram, packing efficiency")
    stats.add_argument("path", help="dataset folder")
    stats.add_argument("--token-budget", type=int, default=None, help="default: 8x the token limit")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--verify", action="store_true", help="decode every sample and report bad ones")
    stats.set_defaults(func=run_stats)
