"""`fitscale data synth|digits|from-images|from-fit-latents|upload|stats`."""

from __future__ import annotations

import argparse
import json

from fitscale.errors import UserError


def _add_write_options(parser: argparse.ArgumentParser, dtype_default: str | None = "float16") -> None:
    parser.add_argument("out", help="dataset folder to write (resumed if an unfinished write is there)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    parser.add_argument("--dtype", default=dtype_default, help="stored latent dtype")
    parser.add_argument("--part-size", type=int, default=4096, help="images per resumable part")
    parser.add_argument("--compression", default=None, help="MDS shard compression, e.g. zstd")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the dataset metadata as JSON")


def _settings(args, writer: str, max_tokens: int, shape: dict | None = None, **options):
    from fitscale.data.writer import WriteSettings

    if args.part_size < 1:
        raise UserError(f"--part-size {args.part_size}: must be at least 1")
    return WriteSettings(
        **(shape or {}),
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
        raise UserError(f"--max-tokens {args.max_tokens}: use 256 or 1024")
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
        raise UserError(
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


def launched_rank(args) -> tuple[int, int]:
    """(rank, world size) of a split write: --rank / --world-size when given, else what torchrun
    (RANK, WORLD_SIZE) or SLURM (SLURM_PROCID, SLURM_NTASKS) set, else (0, 1)."""
    import os

    env = os.environ
    rank = args.rank if args.rank is not None else int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    world = args.world_size
    if world is None:
        world = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    return rank, world


def encode_device(device: str | None) -> str | None:
    """--device, else this rank's GPU when there are GPUs: LOCAL_RANK (or SLURM_LOCALID) modulo
    their count, so the ranks of a node spread over its GPUs; None (the CPU) without one."""
    import os

    if device is not None:
        return device
    import torch

    if not torch.cuda.is_available():
        return None
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return f"cuda:{local % torch.cuda.device_count()}"


def relaunch_ranks(argv: list[str], nproc: int) -> int:
    """Run this `fitscale data ...` command as `nproc` local processes (--rank r --world-size nproc,
    --nproc removed); each writes its parts, the last to finish merges. Exit status: the first
    non-zero one, else 0."""
    import os
    import subprocess
    import sys

    if "--nproc" in argv:
        at = argv.index("--nproc")
        argv = argv[:at] + argv[at + 2 :]
    else:
        argv = [a for a in argv if not a.startswith("--nproc=")]
    command = [sys.executable, "-m", "fitscale.cli", *argv, "--world-size", str(nproc)]
    ranks = [
        subprocess.Popen([*command, "--rank", str(rank)], env={**os.environ, "LOCAL_RANK": str(rank)})
        for rank in range(nproc)
    ]
    codes = [rank.wait() for rank in ranks]
    return next((code for code in codes if code), 0)


def run_from_images(args) -> int:
    """`fitscale data from-images`: encode an ImageFolder with a local diffusers autoencoder; exit status.

    Raises ValueError for a --resolution not a multiple of the pixels per token (downsampling x
    patch size) of at least 4 tokens a side, more class folders than --num-classes, or an
    autoencoder folder that cannot be used (fitscale.data.vae).
    """
    from fitscale.data.images import build_from_images, list_image_folder
    from fitscale.data.vae import check_vae_folder, vae_downsample, vae_patch_size, vae_record
    from fitscale.data.writer import write_dataset

    if args.nproc < 1 or args.workers < 0:
        raise UserError(f"--nproc {args.nproc} --workers {args.workers}: need --nproc >= 1, --workers >= 0")
    if args.patch_size is not None and args.patch_size < 1:
        raise UserError(f"--patch-size {args.patch_size}: must be at least 1")
    if args.pixels_codec is not None and not args.pixels:
        raise UserError(
            f"--pixels-codec {args.pixels_codec}: add --pixels to write the pixels with the latents"
        )
    codec = args.pixels_codec or "png"
    config = check_vae_folder(args.vae)
    downsample = vae_downsample(config)
    patch_size = args.patch_size or vae_patch_size(config)
    step = downsample * patch_size
    if args.resolution % step or args.resolution < 4 * step:
        raise UserError(
            f"--resolution {args.resolution}: use a multiple of {step} (pixels per token: {downsample}x "
            f"downsampling, patch size {patch_size}) of at least {4 * step}"
        )
    inputs, classes = list_image_folder(args.images)
    if len(classes) > args.num_classes:
        raise UserError(f"{args.images}: {len(classes)} class folders but --num-classes {args.num_classes}")
    if args.nproc > 1:  # everything above is checked once, before any process starts
        return relaunch_ranks(args.argv, args.nproc)
    rank, world_size = launched_rank(args)
    max_tokens = (args.resolution // step) ** 2
    record = vae_record(args.vae, config)
    settings = _settings(
        args,
        "from-images",
        max_tokens,
        {"latent_channels": record["latent_channels"], "patch_size": patch_size},
        resolution=args.resolution,
        vae=str(args.vae),
        vae_latents={
            k: v for k, v in record.items() if k not in ("path", "class", "latent_channels", "downsample")
        },
        **({"pixels": codec} if args.pixels else {}),  # a resumed write keeps to it
    )
    build = build_from_images(
        args.vae,
        args.resolution,
        args.batch_size,
        args.dtype,
        args.device,
        patch_size,
        downsample,
        args.workers,
        pixels_to=args.out if args.pixels else None,
        pixels_codec=codec,
    )
    meta = write_dataset(
        args.out,
        inputs,
        build,
        settings,
        overwrite=args.overwrite,
        rank=rank,
        world_size=world_size,
        extra_meta={"classes": classes, "vae": record},
        progress=not args.no_progress,
    )
    if meta is not None and args.pixels:  # the rank that merged the latents merges the pixels
        from fitscale.data.format import SOURCE_ID, read_sample_table
        from fitscale.data.pixels import merge_part_pixels

        table = read_sample_table(args.out, int(meta["num_samples"]))
        merge_part_pixels(args.out, step, codec, table[:, SOURCE_ID])
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


def run_upload(args) -> int:
    """`fitscale data upload DATASET s3://BUCKET/PREFIX`: copy a finished dataset to object storage
    (fitscale.data.remote); exit status. Endpoint and credentials come from the environment."""
    from fitscale.data.remote import upload_dataset

    sent = upload_dataset(args.dataset, args.remote, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"{args.dataset} -> {args.remote}: {sent} files uploaded; train with data.remote={args.remote}")
    return 0


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

    images = commands.add_parser("from-images", help="encode an ImageFolder with a diffusers autoencoder")
    images.add_argument("images", help="ImageFolder root: one subfolder per class")
    _add_write_options(images)
    images.add_argument(
        "--vae", required=True, help="local folder of an AutoencoderKL / AutoencoderDC (save_pretrained)"
    )
    images.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help="latent pixels per token a side (default: 2 for 8x, 1 for 16x+)",
    )
    images.add_argument("--resolution", type=int, default=256, help="S: at most S*S pixels per image")
    images.add_argument("--batch-size", type=int, default=32)
    images.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    images.add_argument(
        "--rank",
        type=int,
        default=None,
        help="this process's share of a split write (default: RANK / SLURM_PROCID)",
    )
    images.add_argument(
        "--world-size", type=int, default=None, help="default: WORLD_SIZE / SLURM_NTASKS, else 1"
    )
    images.add_argument("--nproc", type=int, default=1, help="encode with this many local processes")
    images.add_argument(
        "--workers", type=int, default=2, help="processes per rank that decode and resize images (0: inline)"
    )
    images.add_argument(
        "--pixels",
        action="store_true",
        help="also write the pixels an alignment encoder (train.repa) reads, in the same pass",
    )
    images.add_argument(
        "--pixels-codec",
        choices=("png", "jpeg", "webp"),
        default=None,
        help="with --pixels: png (default, lossless)",
    )
    images.set_defaults(func=run_from_images)

    release = commands.add_parser("from-fit-latents", help="convert the release's latent folders")
    release.add_argument("source", help="folder holding from_16_to_L, greater_than_L_resize, ...")
    _add_write_options(release, dtype_default=None)
    release.add_argument("--rank", type=int, default=0)
    release.add_argument("--world-size", type=int, default=1)
    release.set_defaults(func=run_from_fit_latents)

    upload = commands.add_parser(
        "upload", help="copy a dataset to s3://BUCKET/PREFIX (S3_ENDPOINT_URL, AWS_*)"
    )
    upload.add_argument("dataset", help="a finished dataset folder")
    upload.add_argument("remote", help="s3://BUCKET/PREFIX to train from with data.remote")
    upload.add_argument("--overwrite", action="store_true", help="replace another dataset at the prefix")
    upload.add_argument("--no-progress", action="store_true", help="no progress bar")
    upload.set_defaults(func=run_upload)
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
