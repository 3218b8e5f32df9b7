"""`fitscale eval-paper CKPT --refs DIR --out DIR`: the FiTv2 paper's tables in one command.

For each size of the chosen table it samples `--num` images with the release's settings (below)
through `fitscale sample` into `OUT/samples_HxW/`, evaluates them with `fitscale eval` against
the reference of that size (`ref_HxW.npz`, else the table's ADM batch), and writes `OUT/table.md` and `OUT/table.json` (FID, sFID, IS,
precision, recall, the reference used and the sampling settings per size). Everything is resumable:
a size whose samples are complete (samples.json) is not sampled again, its feature parts
(`OUT/work_HxW/`) are kept, and a size with `OUT/eval_HxW.json` is not evaluated again. Under
torchrun / srun, or with --nproc, sampling and features are spread over every rank.

The settings are those this repository records for the paper (docs/sampling.md, docs/extrapolation.md):
ODE dopri5 (atol 1e-6, rtol 1e-3), guidance 1.5, EMA weights; beyond the training grid the release's
RoPE flags, `--interpolation ntkpro2 --decouple` for square sizes and `--interpolation dynntk
--decouple` for the others (the release README's two commands). `--sample-args` replaces them.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from fitscale.errors import UserError

TABLES = {
    "256": ("256x256", "320x320", "224x448", "160x480"),
    "512": ("512x512", "320x640", "256x768"),
}
ADM_REFERENCES = {"256x256": "VIRTUAL_imagenet256_labeled.npz", "512x512": "VIRTUAL_imagenet512.npz"}
BASE_ARGS = "--cfg 1.5 --sampler dopri5"
TRAINED_SIZES = {"256": ("256x256",), "512": ("512x512",)}  # within the training grid: plain RoPE


def sample_args(table: str, size: str) -> str:
    """The `fitscale sample` flags of one column of the paper's table (see the module docstring)."""
    if size in TRAINED_SIZES[table]:
        return BASE_ARGS
    height, width = size.split("x")
    rope = "--interpolation ntkpro2 --decouple" if height == width else "--interpolation dynntk --decouple"
    return f"{BASE_ARGS} {rope}"


def reference_for(refs: Path, table: str, size: str) -> Path:
    """The reference batch of `size` in `refs`: `ref_HxW.npz` (built by `fitscale eval-ref`) when
    there, else ADM's batch of the table's training size (docs/evaluation.md: what the paper most
    likely used). FileNotFoundError naming the files and where to get them."""
    own = refs / f"ref_{size}.npz"
    if own.is_file():
        return own
    adm = refs / ADM_REFERENCES[TRAINED_SIZES[table][0]]
    if adm.is_file():
        return adm
    raise FileNotFoundError(
        f"no reference batch for {size} in {refs}: download ADM's {adm.name} there (docs/evaluation.md) or "
        f"build {own} with `fitscale eval-ref IMAGENET_TRAIN --size {size} --out {own}`"
    )


def register_paper(subparsers, add_common) -> None:
    """Add `fitscale eval-paper` (with eval's common flags, `add_common`) to `subparsers`."""
    parser = subparsers.add_parser(
        "eval-paper",
        help="the paper's tables: sample and evaluate every size of a table",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("checkpoint", help="run folder, checkpoint or weights file (as fitscale sample)")
    parser.add_argument("--refs", required=True, help="folder of reference batches (ref_HxW.npz or ADM's)")
    parser.add_argument("--out", required=True, help="folder for samples, features and the tables")
    parser.add_argument("--table", default="256", choices=sorted(TABLES), help="256 (default) or 512 models")
    parser.add_argument("--sizes", default=None, help="comma-separated HxW to run instead of the table's")
    parser.add_argument("--num", type=int, default=50000, help="images per size (50000)")
    parser.add_argument("--vae", required=True, help="local AutoencoderKL folder (pictures are evaluated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-args", default=None, help="fitscale sample flags replacing the paper's")
    add_common(parser)
    parser.set_defaults(func=run_paper)


def _sizes(args) -> list[str]:
    from fitscale.eval.cli import parse_size

    sizes = args.sizes.split(",") if args.sizes else list(TABLES[args.table])
    return [f"{h}x{w}" for h, w in (parse_size(size) for size in sizes)]


def run_paper(args) -> int:
    """Sample and evaluate every size (see the module docstring); rank 0 writes the tables."""
    from fitscale.eval.cli import settings_of
    from fitscale.eval.evaluate import check_weights_file

    out, refs = Path(args.out), Path(args.refs)
    sizes = _sizes(args)
    references = {
        size: reference_for(refs, args.table, size) for size in sizes
    }  # all found before any sampling
    check_weights_file(settings_of(args))
    if args.num < 4:
        raise UserError(f"--num {args.num}: precision/recall need more than 3 images per size")
    if args.nproc > 1:
        from fitscale.sample.cli import relaunch

        return relaunch(args)
    common = [
        "--device",
        args.device,
        "--part-size",
        str(args.part_size),
        "--batch-size",
        str(args.batch_size),
    ]
    for flag in ("inception_weights", "inception_sha256"):
        if getattr(args, flag):
            common += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    rows = []
    for size in sizes:
        height, width = size.split("x")
        flags = args.sample_args if args.sample_args is not None else sample_args(args.table, size)
        samples, result_file = out / f"samples_{size}", out / f"eval_{size}.json"
        if not (samples / "samples.json").is_file():
            argv = ["sample", args.checkpoint, "--out", str(samples), "--height", height, "--width", width,
                    "--num-per-size", str(args.num), "--vae", args.vae, "--seed", str(args.seed),
                    "--device", args.device, *shlex.split(flags)]  # fmt: skip
            if (samples / "images").is_dir():
                argv.append("--overwrite")  # a sampling run stopped before its end: sample again
            run_command(argv)
        if not result_file.is_file():
            argv = ["eval", str(samples), "--ref", str(references[size]), "--work", str(out / f"work_{size}"),
                    "--out", str(result_file), "--json", *common]  # fmt: skip
            run_command(argv)
        if result_file.is_file():  # rank 0 wrote it
            rows.append({"size": size, "sample_args": flags, **json.loads(result_file.read_text())})
    if rows:
        write_tables(out, rows)
    return 0


def run_command(argv: list[str]) -> int:
    """Run `fitscale sample ...` or `fitscale eval ...` in this process, by its own parser; an error
    propagates to this command's (one line for bad input, a traceback for a bug)."""
    import argparse

    from fitscale.eval import cli as eval_cli
    from fitscale.sample import cli as sample_cli

    parser = argparse.ArgumentParser(prog="fitscale")
    subparsers = parser.add_subparsers(dest="command", required=True)
    sample_cli.register(subparsers)
    eval_cli.register(subparsers)
    args = parser.parse_args(argv)
    args.argv = list(argv)
    return int(args.func(args) or 0)


def write_tables(out: Path, rows: list[dict]) -> None:
    """`out/table.json` (the rows) and `out/table.md` (the paper's columns, the reference used)."""
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| size | FID | sFID | IS | Precision | Recall | images | reference | sampling |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = "" if r["comparable"] else " (not comparable)"
        lines.append(
            f"| {r['size']} | {r['fid']:.2f} | {r['sfid']:.2f} | {r['inception_score']:.2f} | "
            f"{r['precision']:.2f} | {r['recall']:.2f} | {r['images']} | {Path(r['reference']).name}{note} | "
            f"`{r['sample_args']}` |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
