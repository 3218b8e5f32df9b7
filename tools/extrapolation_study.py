"""The FiTv2 paper's resolution-extrapolation study in miniature, on a digits model.

A model trained on grids of 4..8 tokens a side (recipes/demo.yaml) samples every digit class at
sizes inside its training range and beyond it, once per RoPE extrapolation method of the
release (whlzy/FiT `fit/model/rope.py`, computed by fitscale.models.rope): every method coupled
and decoupled (the paper's "Vision" variants), with and without the attention scale where the
method allows it, frequencies per image, L0 = the training grid edge. A classifier trained on
the real digits (fitscale.sample.demo) reads each sample; the recognition rate per method and
size stands in for the paper's FID (FiTv2, Table of resolution extrapolation).

Every variant samples the same images (class, replica and size give the noise), so methods
differ only by their RoPE. A cell whose cos/sin tables equal, in float32, those of a cell
already sampled (within L0 every method is plain RoPE times its magnitude; decoupling changes
nothing on a square grid) is sampled once and shared.

Writes into `--out`: `recognition-seed<S>.json` (every rate), `recognition-seed<S>.md` (the
table, the command and the run time) and, unless `--no-grids`, one labelled PNG per method
(`<method>-seed<S>.png`: a panel per variant, rows classes, columns sizes). `--compare` adds the
per-cell difference to another seed's json (the spread between seeds); `--summarize` prints the
means within and beyond L0 of several seeds' json. The numbers: docs/extrapolation.md.

    OMP_NUM_THREADS=1 nice -n 10 python tools/extrapolation_study.py --run runs/demo \
        --out docs/extrapolation --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fitscale.config.model import canonical_rope_method
from fitscale.flow.samplers import FIXED_GRID
from fitscale.models.rope import segment_rope_tables
from fitscale.sample.demo import digits_classifier, latent_to_digit
from fitscale.sample.generate import generate_latents, load_sampling_model
from fitscale.sample.options import SamplingOptions
from fitscale.sample.pictures import grid_caption, labelled_grid, preview_latents, save_png
from fitscale.sample.plan import SampleItem

# The release's `custom_freqs` names, in the order of its rope.py.
METHODS = ("none", "linear", "ntk-aware", "ntk-by-parts", "yarn", "ntk-aware-pro1", "ntk-aware-pro2")
# In distribution for grids of 4..8 tokens a side (square, wide, tall), then beyond.
SIZES = ((6, 6), (8, 8), (4, 8), (8, 4), (10, 10), (12, 12), (8, 16), (16, 8), (12, 16), (16, 16))
# The paper's names of the variants it tabulates (FiTv2, resolution extrapolation).
PAPER_NAMES = {
    ("none", False): "plain RoPE",
    ("linear", False): "PI",
    ("ntk-aware", False): "NTK",
    ("yarn", False): "YaRN",
    ("ntk-aware", True): "VisionNTK",
    ("yarn", True): "VisionYaRN",
}


class StudyError(ValueError):
    """A bad argument, reported as one line naming the flag."""


@dataclass(frozen=True)
class Variant:
    """One RoPE setting: a release method, decoupled axes or not, the attention scale or not."""

    method: str
    decoupled: bool
    attn_scale: bool

    @property
    def label(self) -> str:
        """e.g. "ntk-aware, decoupled, attention scale"."""
        parts = [self.method]
        if self.decoupled:
            parts.append("decoupled")
        if self.attn_scale:
            parts.append("attention scale")
        return ", ".join(parts)

    @property
    def paper_name(self) -> str:
        """The paper's name of the variant, or "" where it tabulates none."""
        name = PAPER_NAMES.get((self.method, self.decoupled), "")
        return f"{name} + attention scale" if name and self.attn_scale else name

    def overrides(self, base_grid: int) -> dict:
        """ModelConfig overrides: this variant's RoPE, frequencies per image, L0 = `base_grid`."""
        return {
            "rope_method": canonical_rope_method(self.method),
            "rope_decoupled": self.decoupled,
            "rope_attn_scale": self.attn_scale,
            "rope_per_image": True,
            "rope_target_grid": None,
            "rope_base_grid": base_grid,
        }


def variants_of(methods: list[str]) -> list[Variant]:
    """Every variant of each method: coupled and decoupled (plain RoPE has no scale to decouple),
    without and with the attention scale (the two ntk-aware-pro methods scale already)."""
    out = []
    for method in methods:
        for decoupled in (False,) if method == "none" else (False, True):
            for attn in (False,) if method.startswith("ntk-aware-pro") else (False, True):
                out.append(Variant(method, decoupled, attn))
    return out


def parse_methods(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise StudyError(f"--methods {text!r}: choose from {', '.join(METHODS)} (comma-separated)")
    return names


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        rows, _, cols = part.strip().partition("x")
        if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
            raise StudyError(
                f"--sizes {text!r}: give grids in tokens as ROWSxCOLS, comma-separated, e.g. 8x8,8x16"
            )
        sizes.append((int(rows), int(cols)))
    return sizes


def table_key(model_config, size: tuple[int, int]) -> bytes:
    """The grid and its float32 RoPE tables (row and column frequencies, cos/sin magnitude): two
    cells of equal keys sample equal images (to float32 rounding)."""
    rows, cols, magnitude = segment_rope_tables(model_config, torch.tensor([size]))
    tables = torch.cat([rows.flatten(), cols.flatten(), magnitude]).to(torch.float32)
    return np.array(size, dtype=np.int64).tobytes() + tables.numpy().tobytes()


def study_items(sizes, num_classes: int, per_class: int) -> dict[tuple[int, int], list[SampleItem]]:
    """The same images for every variant: item index (the noise seed) from size, class and replica."""
    items = {}
    for size_index, (rows, cols) in enumerate(sizes):
        items[(rows, cols)] = [
            SampleItem((size_index * num_classes + label) * per_class + replica, label, rows, cols)
            for label in range(num_classes)
            for replica in range(per_class)
        ]
    return items


def run_settings(run: Path, base_grid: int | None, cfg_scale: float | None) -> tuple[int, float]:
    """L0 and the guidance scale: given, or the run's demo settings (`hooks.options`, or the `demo`
    section of older runs): `digits_max_side`, the largest grid side it trained on, and
    `sample_cfg_scale`, its closing grid's guidance."""
    import yaml

    config_file = run / "config.yaml"
    if not config_file.is_file():
        raise StudyError(f"--run {run}: no config.yaml there; give the folder of a training run")
    saved = yaml.safe_load(config_file.read_text()) or {}
    demo = (saved.get("hooks") or {}).get("options") or saved.get("demo") or {}
    if base_grid is None:
        if "digits_max_side" not in demo:
            raise StudyError(
                f"--base-grid: {config_file} has no hooks.options.digits_max_side; "
                "give the training grid edge L0 in tokens"
            )
        base_grid = int(demo["digits_max_side"])
    if base_grid < 2:
        raise StudyError(f"--base-grid {base_grid}: give the training grid edge L0 in tokens, 2 or more")
    return base_grid, float(demo.get("sample_cfg_scale", 4.0) if cfg_scale is None else cfg_scale)


def run_study(args, variants: list[Variant]) -> dict:
    """Sample every (variant, size) cell, once per distinct RoPE table; rates, previews and timing.

    Returns {"rates": {variant label: {"RxC": fraction recognised}}, "previews": {(variant, size):
    one (h, w, 3) uint8 picture per class}, "seconds", "images_sampled", "cells", "distinct_cells",
    "settings"}.
    """
    run = Path(args.run)
    base_grid, cfg_scale = run_settings(run, args.base_grid, args.cfg)
    plain = load_sampling_model(run, ema=True)
    num_classes = plain.config.num_classes
    items = study_items(args.sizes, num_classes, args.per_class)
    options = SamplingOptions(
        sampler=args.sampler,
        steps=args.steps if args.sampler in FIXED_GRID else None,  # adaptive samplers choose their own
        cfg_scale=cfg_scale,
        seed=args.seed,
        token_budget=16384,
    )
    classifier = digits_classifier()
    sampled: dict[bytes, tuple[np.ndarray, list[np.ndarray]]] = {}  # table -> (correct, previews)
    cells: dict[tuple[Variant, tuple[int, int]], bytes] = {}
    started = time.perf_counter()
    images = 0
    for variant in variants:
        overrides = variant.overrides(base_grid)
        config = dataclasses.replace(plain.config, **overrides)
        todo: dict[bytes, tuple[int, int]] = {}
        for size in args.sizes:
            key = table_key(config, size)
            cells[(variant, size)] = key
            if key not in sampled:
                todo.setdefault(key, size)
        if not todo:
            continue
        model = load_sampling_model(run, overrides=overrides, ema=True)
        batch = [item for size in todo.values() for item in items[size]]
        latents = generate_latents(model, batch, options)
        digits = np.stack([latent_to_digit(latent) for latent in latents]).reshape(len(batch), 64)
        correct = classifier.predict(digits) == np.array([item.label for item in batch])
        previews = preview_latents(latents, 0)
        offset = 0
        for key, size in todo.items():
            count = len(items[size])
            sampled[key] = (
                correct[offset : offset + count],
                previews[offset : offset + count : args.per_class],
            )
            offset += count
        images += len(batch)
        print(f"{variant.label}: {len(todo)} of {len(args.sizes)} sizes sampled", file=sys.stderr)
    seconds = time.perf_counter() - started
    rates = {
        variant.label: {f"{r}x{c}": float(sampled[cells[(variant, (r, c))]][0].mean()) for r, c in args.sizes}
        for variant in variants
    }
    return {
        "rates": rates,
        "previews": {cell: sampled[key][1] for cell, key in cells.items()},
        "options": options,
        "seconds": seconds,
        "images_sampled": images,
        "cells": len(cells),
        "distinct_cells": len(sampled),
        "settings": {
            "run": str(run),
            "base_grid": base_grid,
            "cfg_scale": cfg_scale,
            "sampler": args.sampler,
            "steps": args.steps,
            "seed": args.seed,
            "per_class": args.per_class,
            "num_classes": num_classes,
            "sizes": [f"{r}x{c}" for r, c in args.sizes],
        },
    }


def is_beyond(size: str, base_grid: int) -> bool:
    """Whether a grid "RxC" has a side longer than the training edge L0."""
    return max(int(side) for side in size.split("x")) > base_grid


def summary_columns(rates: dict[str, float], base_grid: int) -> tuple[float, float]:
    """Mean recognition within the training sides and beyond them (nan where there is none)."""
    inside = [rate for size, rate in rates.items() if not is_beyond(size, base_grid)]
    beyond = [rate for size, rate in rates.items() if is_beyond(size, base_grid)]
    return (
        float(np.mean(inside)) if inside else float("nan"),
        float(np.mean(beyond)) if beyond else float("nan"),
    )


def markdown_table(rates: dict[str, dict[str, float]], paper: dict[str, str], base_grid: int, fmt) -> str:
    """Rows variants, columns sizes then the means within and beyond L0; cells through `fmt`."""
    sizes = list(next(iter(rates.values())))
    header = ["variant", "paper"] + [f"{s}{'*' if is_beyond(s, base_grid) else ''}" for s in sizes]
    header += ["within L0", "beyond L0"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, row in rates.items():
        inside, beyond = summary_columns(row, base_grid)
        cells = [label, paper.get(label, "")] + [fmt(row[s]) for s in sizes] + [fmt(inside), fmt(beyond)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def percent(value: float) -> str:
    return "-" if np.isnan(value) else f"{100 * value:.0f}"


def check_comparable(other: dict, variants: list[Variant], sizes, path: str) -> None:
    """Refuse a --compare study of other variants or sizes (before anything is sampled)."""
    labels = {variant.label for variant in variants}
    names = {f"{r}x{c}" for r, c in sizes}
    rates = other.get("rates", {})
    if set(rates) != labels or any(set(row) != names for row in rates.values()):
        raise StudyError(
            f"--compare {path}: that study has other methods or sizes; rerun with the same flags"
        )


def summary_table(studies: list[dict], paths: list[str]) -> str:
    """Means of each variant's cells within L0, beyond on square and on other grids, and beyond
    altogether, per seed and over seeds ("s0 / s1 (**mean**)"), for studies of equal variants."""
    first = studies[0]
    for study, path in zip(studies[1:], paths[1:]):
        if set(study["rates"]) != set(first["rates"]) or any(
            set(study["rates"][v]) != set(row) for v, row in first["rates"].items()
        ):
            raise StudyError(f"--summarize {path}: other methods or sizes than {paths[0]}")
    base_grid = first["settings"]["base_grid"]
    sizes = list(next(iter(first["rates"].values())))
    beyond = [s for s in sizes if is_beyond(s, base_grid)]
    groups = {
        "within L0": [s for s in sizes if not is_beyond(s, base_grid)],
        "beyond, square": [s for s in beyond if s.split("x")[0] == s.split("x")[1]],
        "beyond, other": [s for s in beyond if s.split("x")[0] != s.split("x")[1]],
        "beyond L0": beyond,
    }
    seeds = " / ".join(f"seed {study['settings']['seed']}" for study in studies)
    lines = [
        f"| variant ({seeds} (**mean**)) | " + " | ".join(groups) + " |",
        "|" + "---|" * (len(groups) + 1),
    ]
    for variant in first["rates"]:
        cells = []
        for columns in groups.values():
            means = [
                float(np.mean([study["rates"][variant][s] for s in columns])) if columns else float("nan")
                for study in studies
            ]
            cells.append(" / ".join(percent(m) for m in means) + f" (**{percent(float(np.mean(means)))}**)")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def spread_report(rates: dict, other: dict, base_grid: int) -> tuple[str, float]:
    """Per-cell absolute difference (percentage points) between two seeds' rates, and its mean."""
    diff = {v: {s: abs(rates[v][s] - other[v][s]) for s in rates[v]} for v in rates}
    mean = float(np.mean([d for row in diff.values() for d in row.values()]))
    return markdown_table(diff, {}, base_grid, percent), mean


def labelled_panels(study: dict, variants: list[Variant], sizes, num_classes: int, options, scale: int):
    """uint8 (H, W, 3): a labelled grid per variant (rows classes, columns sizes, one sample each,
    * beyond L0) captioned with its rates and settings, stacked top to bottom."""
    base_grid = study["settings"]["base_grid"]
    columns = [f"{rows}x{cols}{'*' if max(rows, cols) > base_grid else ''}" for rows, cols in sizes]
    panels = []
    for variant in variants:
        cells = [
            [study["previews"][(variant, size)][label] for size in sizes] for label in range(num_classes)
        ]
        inside, beyond = summary_columns(study["rates"][variant.label], base_grid)
        paper = f" ({variant.paper_name})" if variant.paper_name else ""
        rates = f"{percent(inside)}% recognised within L0 = {base_grid}, {percent(beyond)}% beyond{paper}"
        caption = f"{rates} | " + grid_caption(options, variant.label, size_unit="tokens")
        panels.append(
            labelled_grid(cells, [str(label) for label in range(num_classes)], columns, caption, scale)
        )
    width = max(panel.shape[1] for panel in panels)
    gap = np.full((8 * scale, width, 3), 255, np.uint8)
    padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in panels]
    return np.concatenate([part for panel in padded for part in (panel, gap)][:-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", help="training run folder (its newest checkpoint, EMA weights); required unless --summarize"
    )
    parser.add_argument("--out", help="folder for the table, json and PNGs; required unless --summarize")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of every image")
    parser.add_argument("--methods", default=",".join(METHODS), help="release method names, comma-separated")
    parser.add_argument(
        "--sizes",
        default=",".join(f"{r}x{c}" for r, c in SIZES),
        help="grids in tokens, ROWSxCOLS, comma-separated",
    )
    parser.add_argument("--per-class", type=int, default=2, help="images per class, size and variant")
    parser.add_argument(
        "--base-grid", type=int, default=None, help="L0 (default: the run's demo.digits_max_side)"
    )
    parser.add_argument(
        "--cfg", type=float, default=None, help="guidance scale (default: the run's demo grid's)"
    )
    parser.add_argument("--sampler", default="heun")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--compare", default=None, help="another seed's recognition json: report the spread")
    parser.add_argument("--no-grids", action="store_true", help="write no PNGs")
    parser.add_argument("--overwrite", action="store_true", help="replace this seed's files in --out")
    parser.add_argument(
        "--summarize",
        nargs="+",
        metavar="JSON",
        help="print the means within and beyond L0 of several seeds' recognition json (samples nothing)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.summarize:
            print(
                summary_table([json.loads(Path(path).read_text()) for path in args.summarize], args.summarize)
            )
            return 0
        if args.run is None or args.out is None:
            raise StudyError("--run and --out are required (or --summarize JSON... to summarise seeds)")
        args.sizes = parse_sizes(args.sizes)
        methods = parse_methods(args.methods)
        if args.per_class < 1:
            raise StudyError(f"--per-class {args.per_class}: must be 1 or more")
        out = Path(args.out)
        stem = f"recognition-seed{args.seed}"
        written = [out / f"{stem}.json", out / f"{stem}.md"]
        written += [] if args.no_grids else [out / f"{method}-seed{args.seed}.png" for method in methods]
        existing = [str(path) for path in written if path.exists()]
        if existing and not args.overwrite:
            raise StudyError(f"--out {out}: {existing[0]} exists; pass --overwrite to replace it")
        other = None
        if args.compare is not None:
            compare = Path(args.compare)
            if not compare.is_file():
                raise StudyError(f"--compare {compare}: no such file; give another seed's {stem}.json")
            other = json.loads(compare.read_text())
        variants = variants_of(methods)
        if other is not None:
            check_comparable(other, variants, args.sizes, args.compare)
        study = run_study(args, variants)
    except (StudyError, ValueError, FileNotFoundError) as error:
        print(f"extrapolation_study: error: {error}", file=sys.stderr)
        return 2
    settings = study["settings"]
    base_grid = settings["base_grid"]
    paper = {variant.label: variant.paper_name for variant in variants}
    command = "OMP_NUM_THREADS=1 python tools/extrapolation_study.py " + shlex.join(argv)
    timing = (
        f"{study['images_sampled']} images sampled for {study['cells']} cells ({study['distinct_cells']} distinct "
        f"RoPE tables) in {study['seconds']:.0f} s"
    )
    lines = [
        f"Recognition rate (%) of {settings['per_class'] * settings['num_classes']} digits per cell "
        f"({settings['per_class']} per class), seed {settings['seed']}, L0 = {base_grid}, "
        f"{settings['sampler']} {settings['steps']} steps, guidance {settings['cfg_scale']:g}; "
        "* = beyond the training sides.",
        "",
        markdown_table(study["rates"], paper, base_grid, percent),
        "",
        f"`{command}`: {timing}.",
    ]
    result = {"settings": settings, "rates": study["rates"], "seconds": study["seconds"], "command": command}
    if other is not None:
        table, mean = spread_report(study["rates"], other["rates"], base_grid)
        seeds = f"seed {settings['seed']} vs seed {other['settings']['seed']}"
        lines += [
            "",
            f"Spread, {seeds}: |difference| per cell in percentage points, mean {100 * mean:.1f}.",
            "",
            table,
        ]
        result["spread_mean"] = mean
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    if not args.no_grids:
        for method in methods:
            chosen = [variant for variant in variants if variant.method == method]
            sheet = labelled_panels(
                study, chosen, args.sizes, settings["num_classes"], study["options"], scale=3
            )
            save_png(sheet, out / f"{method}-seed{args.seed}.png")
    print("\n".join(lines))
    print(timing)
    return 0


if __name__ == "__main__":
    sys.exit(main())
