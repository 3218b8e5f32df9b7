"""`fitscale sample CKPT --height H --width W ...`: images at any resolution from a run or a file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fitscale.errors import UserError
from fitscale.models.extrapolation import INTERPOLATIONS, release_sampling_overrides


def register(subparsers) -> None:
    """Add the `fitscale sample` subcommand and its options (the release's sampling flags among them) to
    `subparsers`.
    """
    from fitscale.clitools import add_set_option

    parser = subparsers.add_parser(
        "sample",
        help="generate images (or latents) at any resolution from a checkpoint",
        description=(
            "Sample class-conditional images with the flow's ODE or SDE. Several --height/--width pairs are "
            "packed into one batch. Under torchrun / srun (or with --nproc) the images are spread over ranks."
        ),
    )
    parser.add_argument(
        "checkpoint", help="run folder, its checkpoints folder, a step-N folder, or a weights file"
    )
    parser.add_argument(
        "--out", required=True, help="output folder (refused if it holds samples, unless --overwrite)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="write into an output folder that holds samples"
    )
    parser.add_argument(
        "--height", type=int, action="append", default=[], help="pixels, a multiple of 16 (repeatable)"
    )
    parser.add_argument(
        "--width", type=int, action="append", default=[], help="pixels, paired with --height in order"
    )
    parser.add_argument("--num-per-size", type=int, default=4, help="images per size (4)")
    parser.add_argument("--labels", default=None, help="comma-separated class labels, cycled; default random")
    parser.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    parser.add_argument(
        "--guide-first-3",
        action="store_true",
        help="guide only the first 3 latent channels (the release's habit)",
    )
    parser.add_argument(
        "--scale-pow",
        type=float,
        default=0.0,
        help="the release's guidance schedule: scale 1 + (cfg - 1)(1 - cos(pi (1 - t)^p)) / 2; 0 = constant",
    )
    parser.add_argument("--mode", default="ode", help="ode (default) or sde, the release's --sampler-mode")
    parser.add_argument(
        "--sampler",
        default=None,
        help="ODE method: euler (default), heun, midpoint, rk4, heun2, heun3, implicit_adams "
        "on --steps; dopri5, dopri8, bosh3, fehlberg2, adaptive_heun by --atol/--rtol; ddpm: the "
        "release's ancestral sampler for objective=ddpm models (--steps respaced steps, 250)",
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps of grid ODE samplers and of the SDE (50)"
    )
    parser.add_argument(
        "--atol", type=float, default=None, help="absolute tolerance of adaptive samplers (1e-6)"
    )
    parser.add_argument(
        "--rtol", type=float, default=None, help="relative tolerance of adaptive samplers (1e-3)"
    )
    parser.add_argument("--sde-sampler", default=None, help="SDE: euler (Euler-Maruyama, default) or heun")
    parser.add_argument(
        "--diffusion-form",
        default=None,
        help="SDE: constant, SBDM, sigma (default), linear, decreasing, increasing-decreasing",
    )
    parser.add_argument("--diffusion-norm", type=float, default=None, help="SDE: diffusion scale (1)")
    parser.add_argument(
        "--last-step", default=None, help="SDE: mean (default), tweedie, euler or none, from t = 1 - size"
    )
    parser.add_argument("--last-step-size", type=float, default=None, help="SDE: last step's size (0.04)")
    parser.add_argument(
        "--time-shift", type=float, default=1.0, help="shift of the time grid (< 1: more steps near noise)"
    )
    parser.add_argument(
        "--extrapolation",
        default=None,
        choices=("none", "linear", "ntk", "yarn", "vision-ntk", "vision-yarn"),
        help="RoPE extrapolation for sizes beyond training, per image; default: the model's own",
    )
    parser.add_argument(
        "--attn-scale", action="store_true", help="add the attention-logit scale to the extrapolation"
    )
    parser.add_argument(
        "--interpolation",
        default=None,
        help=f"the release's sample_fitv2_ddp.py RoPE flag, per image, instead of --extrapolation: one of "
        f"{', '.join(INTERPOLATIONS)} (dynntk = NTK-aware, partntk = NTK-by-parts, ntkpro1/2 = NTK-aware "
        "with the release's attention scales)",
    )
    parser.add_argument(
        "--decouple", action="store_true", help="with --interpolation: scale rows and columns separately"
    )
    parser.add_argument(
        "--ori-max-pe-len",
        type=int,
        default=None,
        help="with --interpolation: the training grid edge L0 in tokens (default: the model's own)",
    )
    parser.add_argument("--raw", action="store_true", help="raw weights instead of the EMA")
    parser.add_argument(
        "--model", default=None, help="preset of a weights file (e.g. fitv2-xl); runs know theirs"
    )
    add_set_option(parser, "model fields", "attn_backend=reference")
    parser.add_argument(
        "--vae",
        default=None,
        help="local AutoencoderKL folder to decode with; without it latents are written",
    )
    parser.add_argument(
        "--preview-channel", type=int, default=None, help="without --vae: write this latent channel as PNGs"
    )
    parser.add_argument(
        "--grid-scale", type=int, default=1, help="upscale grid.png by this factor (small latents)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--token-budget", type=int, default=16384, help="tokens per forward pass (with --no-batch-invariant)"
    )
    parser.add_argument(
        "--batch-invariant",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="sample each image alone, so it is the same bit for bit in any batch and on any rank "
        "(default); --no-batch-invariant packs images into shared forwards: faster on a GPU, an image then "
        "moves with its batch mates by up to the solver's tolerance (docs/sampling.md)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="compute dtype (auto: bf16 on CUDA)"
    )
    parser.add_argument("--nproc", type=int, default=1, help="spread over N local processes")
    parser.add_argument(
        "--fid-reference",
        default=None,
        help=argparse.SUPPRESS,  # removed: `fitscale eval OUT --ref REF.npz` evaluates a sample folder
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(func=run_sample)


def parse_sizes(heights: list[int], widths: list[int]) -> list[tuple[int, int]]:
    """(height, width) pixel pairs from the repeated --height/--width flags; ValueError unless they pair
    up one to one.
    """
    if not heights or len(heights) != len(widths):
        raise UserError(
            f"give one --width per --height (got {len(heights)} heights, {len(widths)} widths), e.g. --height 256 --width 256"
        )
    return list(zip(heights, widths))


def rope_overrides(args) -> dict:
    """ModelConfig overrides of --extrapolation / --attn-scale or of the release's --interpolation,
    --decouple and --ori-max-pe-len. Raises ValueError naming the flag of a bad value or combination."""
    from fitscale.sample.options import extrapolation_overrides

    if args.interpolation is None:
        if args.decouple or args.ori_max_pe_len is not None:
            flag = "--decouple" if args.decouple else "--ori-max-pe-len"
            raise UserError(
                f"{flag} goes with --interpolation (the release's flags); e.g. --interpolation dynntk"
            )
        return extrapolation_overrides(args.extrapolation, args.attn_scale)
    if args.extrapolation is not None:
        raise UserError(
            f"--extrapolation {args.extrapolation} and --interpolation {args.interpolation} both choose the "
            "RoPE extrapolation: give one"
        )
    overrides = release_sampling_overrides(args.interpolation, args.decouple, args.ori_max_pe_len)
    if args.attn_scale:
        if args.interpolation in ("ntkpro1", "ntkpro2"):
            raise UserError(
                f"--attn-scale with --interpolation {args.interpolation}: that method scales attention "
                "already; drop --attn-scale"
            )
        overrides["rope_attn_scale"] = True
    return overrides


def parse_labels(text: str | None) -> list[int] | None:
    """Class labels from --labels '1,207,360'; None for random labels (absent, empty or 'random');
    ValueError otherwise.
    """
    if text in (None, "", "random"):
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--labels {text!r}: expected comma-separated integers such as 1,207,360") from None


def sampling_options(args):
    """The `SamplingOptions` of the command's flags (ValueError naming a bad flag; CommandError when
    the sampler needs torchdiffeq and it is not installed)."""
    from fitscale.clitools import CommandError
    from fitscale.flow.samplers import WRITTEN_OUT, import_torchdiffeq
    from fitscale.sample.options import SamplingOptions

    options = SamplingOptions(
        mode=args.mode,
        sampler=args.sampler,
        steps=args.steps,
        atol=args.atol,
        rtol=args.rtol,
        sde_sampler=args.sde_sampler,
        diffusion_form=args.diffusion_form,
        diffusion_norm=args.diffusion_norm,
        last_step=args.last_step,
        last_step_size=args.last_step_size,
        time_shift=args.time_shift,
        cfg_scale=args.cfg,
        scale_pow=args.scale_pow,
        # the release's forward_with_cfg guides the first 3 channels of a ddpm model's eps
        guidance_channels=3 if args.guide_first_3 or str(args.sampler).lower() == "ddpm" else None,
        seed=args.seed,
        token_budget=args.token_budget,
        batch_invariant=args.batch_invariant,
        autocast=args.dtype,
    )
    if options.mode == "ode" and options.sampler not in (*WRITTEN_OUT, "ddpm"):
        try:
            import_torchdiffeq()
        except ImportError as error:
            raise CommandError(f"--sampler {options.sampler}: {error}") from None
    return options


def warn_scale_pow(options) -> None:
    """One stderr line (rank 0) when --scale-pow meets --sampler ddpm: the release's schedule reads the
    timestep index clamped at 1, so it is 1 (no guidance) at every index but 0. The numbers stay the
    release's."""
    if options.mode == "ode" and options.sampler == "ddpm" and options.scale_pow > 0:
        if os.environ.get("RANK", "0") == "0":
            print(
                f"warning: --scale-pow {options.scale_pow} with --sampler ddpm reads the timestep index as "
                "the release does (clamped at 1), so guidance is off at every step but the last; drop "
                "--scale-pow to guide every step (docs/sampling.md)",
                file=sys.stderr,
            )


def ddpm_options(options, objective: str, checkpoint):
    """`options` checked against the model's objective (UserError for a sampler of the other family),
    with a run's `train.ddpm` diffusion for --sampler ddpm (the release's defaults for a weights file)."""
    import dataclasses

    from fitscale.sample.generate import training_ddpm
    from fitscale.sample.options import check_objective

    check_objective(objective, options)
    if objective != "ddpm":
        return options
    return dataclasses.replace(options, ddpm=training_ddpm(checkpoint))


def relaunch(args) -> int:
    """Run this very command (`args.argv` without --nproc) on --nproc local ranks."""
    from fitscale.runtime.local import launch_local, python_module_command

    argv = list(args.argv)
    if "--nproc" in argv:
        index = argv.index("--nproc")
        del argv[index : index + 2]
    else:
        argv = [a for a in argv if not a.startswith("--nproc=")]
    return launch_local(python_module_command("fitscale.cli", *argv), args.nproc)


def weights_identity(checkpoint: str, ema: bool) -> str:
    """Which weights a run samples: the resolved checkpoint (a weights file with its size and mtime),
    EMA or raw; recorded so that resuming into a folder sampled from other weights is refused."""
    from fitscale.checkpoint.layout import find_checkpoint

    path = Path(checkpoint)
    if path.is_file():
        stat = path.stat()
        where = f"{path.resolve()} ({stat.st_size} bytes, mtime {stat.st_mtime_ns})"
    else:
        where = str(find_checkpoint(path).resolve())
    return f"{where} {'ema' if ema else 'raw'}"


def run_sample(args) -> int:
    """`fitscale sample`: sample images at the requested sizes from a checkpoint or weights file, on
    this process's rank, into --out; exit status 0.

    Everything is checked before a model loads or a file is written: sizes, labels and sampling
    options (ValueError), an --out already holding samples without --overwrite (FileExistsError),
    the removed --fid-reference (UserError naming `fitscale eval`), a VAE that does not match the
    training dataset. The sampler's family (flow or ddpm) is checked against the model's objective
    once the model is loaded, still before any file is written. With --nproc N it relaunches itself
    on N local ranks.
    """
    sizes = parse_sizes(args.height, args.width)
    labels = parse_labels(args.labels)
    options = sampling_options(args)  # checked before anything starts or is written
    rope = rope_overrides(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; samples are written into a folder: pick another --out")
    if (out / "samples.json").exists() and not args.overwrite:
        raise FileExistsError(
            f"{out} already holds samples (samples.json); pick another --out or pass --overwrite"
        )
    if args.fid_reference:
        raise UserError(
            f"--fid-reference: sampling no longer evaluates; sample, then run `fitscale eval {out} --ref "
            f"{args.fid_reference}` (ADM's FID, sFID, IS, precision and recall; docs/evaluation.md)"
        )
    if args.vae is not None:
        from fitscale.data.vae import check_vae_folder, check_vae_matches_dataset
        from fitscale.sample.generate import training_dataset

        check_vae_folder(args.vae)  # before any process starts or any model loads
        dataset = training_dataset(Path(args.checkpoint))
        if dataset is not None:
            check_vae_matches_dataset(args.vae, dataset)
    if args.nproc > 1:
        return relaunch(args)
    warn_scale_pow(options)

    import torch
    import torch.distributed as dist

    from fitscale.data.vae import PIXELS_PER_TOKEN, check_vae_folder, vae_downsample
    from fitscale.models.cli import parse_overrides
    from fitscale.runtime.env import init_distributed_from_env, leave_process_group
    from fitscale.sample.generate import load_sampling_model
    from fitscale.sample.plan import plan_items
    from fitscale.sample.run import SampleRun, run_sampling

    overrides = {
        **parse_overrides(args.overrides),
        **rope,
    }
    info = init_distributed_from_env(args.device)
    device = (
        torch.device("cuda", info.local_rank) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    )
    model = load_sampling_model(args.checkpoint, args.model, overrides, ema=not args.raw, device=device)
    options = ddpm_options(options, model.config.objective, args.checkpoint)
    pixels_per_token = PIXELS_PER_TOKEN
    if args.vae is not None:  # a token covers the autoencoder's downsampling times the patch size
        pixels_per_token = vae_downsample(check_vae_folder(args.vae)) * model.config.patch_size
    items = plan_items(
        sizes, args.num_per_size, model.config.num_classes, labels, args.seed, pixels_per_token
    )
    from fitscale.sample.pictures import extrapolation_name, grid_caption

    run = SampleRun(
        out,
        items,
        options,
        vae=args.vae,
        preview_channel=args.preview_channel,
        grid_scale=args.grid_scale,
        resume=not args.overwrite,
        weights=weights_identity(args.checkpoint, ema=not args.raw),
        caption=grid_caption(options, extrapolation_name(model.config)),
    )
    from fitscale.diskspace import named_out_of_space

    # A full disk or quota while writing images, latents or the grid: one line naming --out.
    fix = "free space there or pass another --out; a rerun writes every image again"
    with named_out_of_space(out, "the samples", fix):
        run_sampling(model, run, info.rank, info.world_size)
    summary = {"out": str(out), "images": len(items), "sizes": [f"{h}x{w}" for h, w in sizes]}
    if info.world_size > 1:
        dist.barrier()
        leave_process_group()
    if info.rank == 0:
        print(
            json.dumps(summary, indent=1) if args.json else ", ".join(f"{k}: {v}" for k, v in summary.items())
        )
    return 0
