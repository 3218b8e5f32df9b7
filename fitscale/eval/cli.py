"""`fitscale eval SAMPLE --ref REF`: the ADM suite (FID, sFID, IS, precision, recall);
`fitscale eval-ref FOLDER --size HxW --out REF.npz`: an ADM reference batch of our own;
`fitscale eval-paper CKPT --refs DIR --out DIR`: the paper's tables (fitscale.eval.paper)."""

from __future__ import annotations

import json
from pathlib import Path

from fitscale.errors import UserError


def _add_common(parser) -> None:
    parser.add_argument(
        "--inception-weights",
        default=None,
        help="local torch-fidelity Inception file (default: $FITSCALE_INCEPTION_WEIGHTS, then torch hub's cache)",
    )
    parser.add_argument(
        "--inception-sha256",
        default=None,
        help="expected sha256 (prefix) of the weights; default: the TF FID Inception's. 'none' skips the check",
    )
    parser.add_argument(
        "--work", default=None, help="folder of feature parts (resume; needed with several ranks)"
    )
    parser.add_argument(
        "--part-size", type=int, default=1000, help="images per resumable feature part (1000)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (ADM: 64)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--nproc", type=int, default=1, help="spread over N local processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def register(subparsers) -> None:
    """Add `fitscale eval`, `fitscale eval-ref` and `fitscale eval-paper` to `subparsers`."""
    parser = subparsers.add_parser(
        "eval",
        help="FID, sFID, IS, precision, recall of a sample batch (OpenAI's ADM suite)",
        description="Evaluate a sample batch (ADM .npz with arr_0, an image folder, or a `fitscale sample` "
        "folder) against an ADM reference batch exactly as guided-diffusion's evaluator.py does. Under "
        "torchrun / srun (or with --nproc) the features are computed over every rank. docs/evaluation.md",
    )
    parser.add_argument(
        "sample", help="sample batch: .npz (arr_0, uint8 NHWC), image folder or sample folder"
    )
    parser.add_argument(
        "--ref", required=True, help="ADM reference batch .npz (mu, sigma, mu_s, sigma_s, arr_0)"
    )
    parser.add_argument(
        "--save-features",
        default=None,
        help="write the sample's features (pool, spatial, softmax) to FILE.npz",
    )
    parser.add_argument(
        "--save-ref-features", default=None, help="write the reference arr_0's features to FILE.npz"
    )
    parser.add_argument(
        "--features-only", action="store_true", help="compute (and save) the features, skip the metrics"
    )
    parser.add_argument(
        "--ref-stats-from-arr0",
        action="store_true",
        help="a reference without mu/sigma: compute them from its arr_0 (labelled NOT comparable)",
    )
    parser.add_argument("--out", default=None, help="also write the result as JSON to this file")
    _add_common(parser)
    parser.set_defaults(func=run_eval)

    ref = subparsers.add_parser(
        "eval-ref",
        help="build an ADM-format reference batch from an image folder at any size",
        description="Statistics (mu, sigma, mu_s, sigma_s) of every picture of FOLDER (and below) resized to "
        "--size, plus 10,000 of them as arr_0. Square: ADM's center_crop_arr; non-square: --recipe.",
    )
    ref.add_argument("folder", help="folder of training pictures (searched recursively)")
    ref.add_argument("--size", required=True, help="HxW in pixels, e.g. 256x256 or 224x448")
    ref.add_argument("--out", required=True, help="reference .npz to write")
    ref.add_argument(
        "--recipe",
        default="crop",
        choices=("crop", "area"),
        help="non-square sizes: crop = aspect-preserving resize then centre crop (default); area = resize to HxW",
    )
    ref.add_argument("--seed", type=int, default=0, help="which 10,000 pictures go to arr_0")
    _add_common(ref)
    ref.set_defaults(func=run_eval_ref)

    from fitscale.eval.paper import register_paper

    register_paper(subparsers, _add_common)


def parse_size(text: str) -> tuple[int, int]:
    """(height, width) from 'HxW'; ValueError naming the flag otherwise."""
    try:
        height, width = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected HxW in pixels, e.g. 256x256 or 224x448") from None
    if min(height, width) < 1:
        raise UserError(f"--size {text!r}: sides must be positive")
    return height, width


def settings_of(args, **extra):
    """The EvalSettings of the common flags."""
    from fitscale.eval.evaluate import EvalSettings
    from fitscale.eval.inception import WEIGHTS_SHA256_PREFIX

    sha = args.inception_sha256
    sha = None if sha and sha.lower() == "none" else (sha or WEIGHTS_SHA256_PREFIX)
    for flag, value in (("--part-size", args.part_size), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    return EvalSettings(
        inception_weights=args.inception_weights,
        inception_sha256=sha,
        part_size=args.part_size,
        batch_size=args.batch_size,
        **extra,
    )


def join_ranks(args):
    """(rank, world_size, device) after joining the job's process group (gloo on CPU)."""
    import torch

    from fitscale.runtime.env import init_distributed_from_env

    info = init_distributed_from_env(args.device)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return info.rank, info.world_size, (f"cuda:{info.local_rank}" if use_cuda else "cpu")


def print_result(result: dict, as_json: bool) -> None:
    """The metrics on one line each (or the whole result as JSON)."""
    if as_json:
        print(json.dumps(result, indent=1))
        return
    for key, label in (
        ("fid", "FID"),
        ("sfid", "sFID"),
        ("inception_score", "Inception Score"),
        ("precision", "Precision"),
        ("recall", "Recall"),
    ):
        print(f"{label}: {result[key]:.6g}")
    print(
        f"({result['images']} images {result['size']}; reference {result['reference']}: {result['reference_statistics']})"
    )
    if not result["comparable"]:
        print("NOT comparable with published numbers (see reference_statistics and inception_sha256)")


def _refuse_existing(path: str | None, overwrite: bool, flag: str) -> None:
    """Before any work: refuse an output file that exists (unless --overwrite) and make its folder,
    so that a finished evaluation is never lost to a missing folder at its end."""
    if path is None:
        return
    if Path(path).exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pick another {flag} or pass --overwrite")
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def run_eval(args) -> int:
    """`fitscale eval`: evaluate on every rank; rank 0 prints (and writes --out). Exit status 0."""
    from fitscale.eval.evaluate import evaluate

    settings = settings_of(args, ref_stats_from_arr0=args.ref_stats_from_arr0)
    _refuse_existing(args.out, args.overwrite, "--out")
    _refuse_existing(args.save_features, args.overwrite, "--save-features")
    _refuse_existing(args.save_ref_features, args.overwrite, "--save-ref-features")
    if args.nproc > 1:
        if args.work is None:
            raise UserError("--nproc shares features through a folder: pass --work DIR")
        from fitscale.sample.cli import relaunch

        return relaunch(args)
    rank, world_size, settings.device = join_ranks(args)
    try:
        result = evaluate(
            args.sample,
            args.ref,
            settings,
            args.work,
            args.save_features,
            args.overwrite,
            rank,
            world_size,
            args.save_ref_features,
            metrics=not args.features_only,
        )
    finally:
        from fitscale.runtime.env import leave_process_group

        leave_process_group()
    if rank == 0:
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
        if args.features_only:
            print(
                json.dumps(result, indent=1)
                if args.json
                else ", ".join(f"{k}: {v}" for k, v in result.items())
            )
        else:
            print_result(result, args.json)
    return 0


def run_eval_ref(args) -> int:
    """`fitscale eval-ref`: features of every picture over every rank; rank 0 writes the batch."""
    import tempfile

    from fitscale.eval.evaluate import batch_features, check_weights_file
    from fitscale.eval.reference import ResizedFolder, write_reference

    height, width = parse_size(args.size)
    settings = settings_of(args)
    _refuse_existing(args.out, args.overwrite, "--out")
    source = ResizedFolder(args.folder, height, width, args.recipe)
    if source.count < 2:
        raise UserError(f"{args.folder}: {source.count} picture; the statistics need at least 2")
    sha256 = check_weights_file(settings)
    if args.nproc > 1:
        if args.work is None:
            raise UserError("--nproc shares features through a folder: pass --work DIR")
        from fitscale.sample.cli import relaunch

        return relaunch(args)
    rank, world_size, settings.device = join_ranks(args)
    if world_size > 1 and args.work is None:
        raise UserError(
            "several ranks share their features through a folder: pass --work DIR (shared filesystem)"
        )
    with tempfile.TemporaryDirectory(prefix="fitscale-eval-ref-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        try:
            reduced = batch_features(source, work, settings, sha256, rank, world_size, gather=False)
        finally:
            from fitscale.runtime.env import leave_process_group

            leave_process_group()
        if rank == 0:
            kept = write_reference(
                Path(args.out), source, reduced.pool_stats, reduced.spatial_stats, args.seed
            )
            summary = {
                "out": args.out,
                "pictures": source.count,
                "arr_0": kept,
                "size": f"{height}x{width}",
                "recipe": "center_crop_arr" if height == width else args.recipe,
                "inception_sha256": sha256,
            }
            print(
                json.dumps(summary, indent=1)
                if args.json
                else ", ".join(f"{k}: {v}" for k, v in summary.items())
            )
    return 0
