"""The ladder in miniature (docs/ladder.md): rungs from FiT v1 to FiTv2, one switch at a time, trained
at equal training FLOPs on the digits and compared by sample quality, not by loss.

    python tools/ladder_study.py plan    recipes/ladder/digits_today.yaml
    python tools/ladder_study.py train   recipes/ladder/digits_today.yaml --jobs 2
    python tools/ladder_study.py report  recipes/ladder/digits_today.yaml --docs docs/ladder

A ladder file (YAML) names a base recipe, the settings every rung shares, and the rungs: each a name,
`--set` overrides (`model.overrides.adaln=normal`, `train.flow.timesteps=uniform`), the sampler its
objective needs, and the paper's reference. The reference rung trains `reference_steps` steps; every
other rung trains the steps that cost the same training FLOPs (fitscale.models.flops), so a rung
whose network is dearer per step trains proportionally fewer. Each rung trains once per seed, in its
own run folder `<out_dir>/<rung>_s<seed>`, checkpointing every 1/`eval_points` of its steps.

`train` starts every run that has not reached its steps as `fitscale train` in a subprocess with
OMP_NUM_THREADS=1 (`--jobs` at once), resuming unfinished ones from their newest checkpoint; a run
folder is only ever continued, never overwritten (`fitscale train` refuses a changed config).
`report` scores every checkpoint with fitscale.eval.digits_quality (`--jobs` worker processes;
cached by run, step and settings in `<out_dir>/quality.json`, so a rerun scores only new checkpoints), interpolates each
run's steps to the quality threshold, and writes `<docs>/results.json` and `<docs>/table.md`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fitscale.checkpoint.layout import complete_steps, step_dirname
from fitscale.config import load_config
from fitscale.config.schema import load_structured
from fitscale.errors import UserError

# The paper's FID-50K at 400K steps, ImageNet 256x256, B/2 models, cfg 1 (FiTv2 paper).
PAPER_FID_400K = {"DiT-B/2": 45.33, "SiT-B/2": 36.7, "FiT-B/2": 36.36, "FiTv2-B/2": 26.03}
# The paper's training compute to FiTv2's quality over FiTv2's: FiTv2 about 2x faster than FiT, 2.5-3.5x than SiT.
PAPER_RATIO = {"FiT-B/2": "2", "SiT-B/2": "2.5-3.5", "FiTv2-B/2": "1"}
QUALITY_FILE = "quality.json"


@dataclass
class Rung:
    """One rung: `--set` overrides of the shared recipe, the sampler its objective needs, the paper's model."""

    name: str
    overrides: list[str] = field(default_factory=list)
    sampler: str | None = None  # default: the ladder's quality.sampler (a DDPM rung needs `ddpm`)
    # default: the ladder's quality.steps; a rung's sampler may need other steps for the same number
    # of network evaluations (Heun evaluates the network twice per step, DDPM once)
    sampler_steps: int | None = None
    paper: str = ""  # the paper's model or ablation row this rung stands for


@dataclass
class Ladder:
    """A ladder file (recipes/ladder/*.yaml), loaded by `load_ladder`."""

    name: str
    recipe: str
    out_dir: str
    rungs: list[Rung]
    reference: str  # the rung every ratio is against (FiTv2)
    reference_steps: int  # steps of the reference rung; the others train at its FLOPs
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    eval_points: int = 8  # checkpoints along each run, every 1/eval_points of its steps
    tokens_per_image: int = 36  # mean tokens of a training image, for the FLOP count
    overrides: list[str] = field(default_factory=list)  # `--set` for every rung
    quality: dict[str, Any] = field(default_factory=dict)  # fitscale.eval.digits_quality.QualitySettings
    threshold_recognised: float = 0.6  # "steps to quality": first step the recognition rate reaches this
    threshold_frechet: float | None = None  # and/or first step the Frechet distance falls to this

    def __post_init__(self) -> None:
        names = [r.name for r in self.rungs]
        if len(set(names)) != len(names) or not names:
            raise UserError(f"ladder {self.name!r}: rung names must be unique and at least one, got {names}")
        if self.reference not in names:
            raise UserError(
                f"ladder {self.name!r}: reference {self.reference!r} is not a rung; rungs: {names}"
            )
        if self.reference_steps < self.eval_points or self.eval_points < 1:
            raise UserError(
                f"ladder {self.name!r}: reference_steps={self.reference_steps}, eval_points={self.eval_points}: "
                "need 1 <= eval_points <= reference_steps"
            )


def load_ladder(path: str | Path) -> Ladder:
    """A Ladder from YAML; one-line ConfigError (a ValueError) naming the file and field otherwise."""
    return load_structured(Ladder, files=[("ladder", path)], source=f"ladder {str(path)!r}")


@dataclass
class LadderRun:
    """One (rung, seed) run: its folder, steps at the ladder's equal FLOPs, and its `--set` list."""

    rung: str
    seed: int
    steps: int
    flops_per_step: int
    interval: int  # checkpoint every this many steps
    run_dir: str
    overrides: list[str]

    @property
    def name(self) -> str:
        """`<rung>_s<seed>`, the run folder's name."""
        return f"{self.rung}_s{self.seed}"


def flops_per_step(ladder: Ladder, rung: Rung) -> tuple[int, int]:
    """(training FLOPs of one step, images per step) of `rung`'s network on `tokens_per_image`-token images.

    UserError names the rung when its overrides do not make a valid config."""
    from fitscale.models.flops import training_flops  # lazy: heavy

    try:
        config = load_config(ladder.recipe, [*ladder.overrides, *rung.overrides])
    except ValueError as error:
        raise UserError(f"ladder {ladder.name!r}, rung {rung.name!r}: {error}") from None
    batch = int(config.data.global_batch_size)
    return training_flops(config.model.config(), [ladder.tokens_per_image] * batch), batch


def equal_flops_steps(reference_steps: int, reference_flops: int, rung_flops: int) -> int:
    """Steps of a rung costing `rung_flops` per step to spend the reference's `reference_steps` x
    `reference_flops`, rounded to the nearest step (>= 1)."""
    return max(1, round(reference_steps * reference_flops / rung_flops))


def plan_ladder(
    ladder: Ladder, rungs: list[str] | None = None, seeds: list[int] | None = None
) -> list[LadderRun]:
    """Every (rung, seed) run, rungs in the file's order; `rungs` / `seeds` pick a subset."""
    by_name = {r.name: r for r in ladder.rungs}
    unknown = sorted(set(rungs or []) - set(by_name))
    if unknown:
        raise UserError(f"--rungs: no rung named {', '.join(unknown)}; rungs: {', '.join(by_name)}")
    reference_flops, _ = flops_per_step(ladder, by_name[ladder.reference])
    runs = []
    for rung in ladder.rungs:
        if rungs and rung.name not in rungs:
            continue
        per_step, _ = flops_per_step(ladder, rung)
        steps = equal_flops_steps(ladder.reference_steps, reference_flops, per_step)
        interval = max(1, steps // ladder.eval_points)
        for seed in seeds if seeds is not None else ladder.seeds:
            run_dir = str(Path(ladder.out_dir) / f"{rung.name}_s{seed}")
            overrides = [
                *ladder.overrides,
                *rung.overrides,
                f"train.steps={steps}",
                f"train.seed={seed}",
                f"train.run_dir={run_dir}",
                f"checkpoint.interval={interval}",
                "checkpoint.keep_last=0",  # every checkpoint stays: each is a point of the curve
            ]
            runs.append(LadderRun(rung.name, seed, steps, per_step, interval, run_dir, overrides))
    return runs


def run_done(run: LadderRun) -> bool:
    """Whether the run folder holds a complete checkpoint at or past the run's steps."""
    steps = complete_steps(Path(run.run_dir) / "checkpoints")
    return bool(steps) and steps[-1] >= run.steps


def pending_runs(runs: list[LadderRun]) -> list[LadderRun]:
    """The runs that have not reached their steps (new or partial), in order."""
    return [run for run in runs if not run_done(run)]


def train_command(ladder: Ladder, run: LadderRun) -> list[str]:
    """`fitscale train RECIPE --set ... --nproc 1` of one run, with this interpreter."""
    command = [sys.executable, "-m", "fitscale.cli", "train", ladder.recipe, "--nproc", "1"]
    for override in run.overrides:
        command += ["--set", override]
    return command


def train_run(ladder: Ladder, run: LadderRun) -> float:
    """Train (or continue) one run in a subprocess with OMP_NUM_THREADS=1; its output is appended to
    `<out_dir>/logs/<run>.log`. Returns wall seconds; RuntimeError names the run and its log on failure."""
    logs = Path(ladder.out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{run.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    with log_path.open("a") as log:
        code = subprocess.call(train_command(ladder, run), stdout=log, stderr=subprocess.STDOUT, env=env)
    if code:
        raise RuntimeError(f"ladder run {run.name} failed (exit {code}); see {log_path}")
    return time.perf_counter() - start


def train_ladder(ladder: Ladder, runs: list[LadderRun], jobs: int = 1) -> dict[str, float]:
    """Train every pending run of `runs`, `jobs` at a time; {run name: wall seconds}. The recipe's
    `hooks.before` (the demo's: write the digits dataset) run first, here, so parallel runs never
    race to write the dataset."""
    from fitscale.train.cli import resolve_hook  # lazy: heavy

    todo = pending_runs(runs)
    if not todo:
        return {}
    config = load_config(ladder.recipe, ladder.overrides)
    for name in config.hooks.before:
        resolve_hook("before", name)(config)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {run.name: pool.submit(train_run, ladder, run) for run in todo}
        return {name: future.result() for name, future in futures.items()}


def quality_settings(ladder: Ladder, rung: Rung):
    """The ladder's QualitySettings with the rung's sampler and its steps."""
    from fitscale.eval.digits_quality import QualitySettings  # lazy: optional extra

    values = dict(ladder.quality)
    if rung.sampler:
        values["sampler"] = rung.sampler
    if rung.sampler_steps:
        values["steps"] = rung.sampler_steps
    return QualitySettings.from_dict(values, f"ladder {ladder.name!r}: quality")


def score_checkpoint(step_dir: str, settings: dict[str, Any]) -> dict[str, float]:
    """{recognised, frechet} of one checkpoint (fitscale.eval.digits_quality), in a worker process."""
    from fitscale.eval.digits_quality import QualitySettings, digits_quality  # lazy: optional extra

    result = digits_quality(step_dir, QualitySettings.from_dict(settings, step_dir))
    return {"recognised": result.recognised, "frechet": result.frechet}


def score_runs(
    ladder: Ladder, runs: list[LadderRun], jobs: int = 1
) -> dict[str, dict[int, dict[str, float]]]:
    """{run: {step: {recognised, frechet}}} of every complete checkpoint. Scores are cached in
    `<out_dir>/quality.json` under (run, step, settings), written (atomically) as each new score
    arrives; new checkpoints are scored `jobs` at a time in fresh processes with OMP_NUM_THREADS=1
    (one process scores in this one)."""
    cache_path = Path(ladder.out_dir) / QUALITY_FILE
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    rungs = {r.name: r for r in ladder.rungs}
    keys: dict[str, dict[int, str]] = {}
    missing: dict[str, tuple[str, dict[str, Any]]] = {}
    for run in runs:
        settings = asdict(quality_settings(ladder, rungs[run.rung]))
        keys[run.name] = {}
        for step in complete_steps(Path(run.run_dir) / "checkpoints"):
            step_dir = f"{run.run_dir}/checkpoints/{step_dirname(step)}"
            key = f"{run.run_dir}/{step_dirname(step)} {json.dumps(settings, sort_keys=True)}"
            keys[run.name][step] = key
            if key not in cache:
                missing[key] = (step_dir, settings)

    def keep(key: str, score: dict[str, float]) -> None:
        cache[key] = score
        partial = cache_path.with_name(QUALITY_FILE + ".partial")
        partial.write_text(json.dumps(cache, indent=1))
        partial.replace(cache_path)

    if jobs <= 1:
        for key, (step_dir, settings) in missing.items():
            keep(key, score_checkpoint(step_dir, settings))
    elif missing:
        import multiprocessing

        threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers spawned below, read by their torch
        try:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
                futures = {pool.submit(score_checkpoint, *missing[key]): key for key in missing}
                for future in concurrent.futures.as_completed(futures):
                    keep(futures[future], future.result())
        finally:
            if threads is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = threads
    return {name: {step: cache[key] for step, key in steps.items()} for name, steps in keys.items()}


def steps_to_threshold(
    curve: dict[int, float], threshold: float, higher_is_better: bool = True
) -> float | None:
    """The first step a metric reaches `threshold`, linearly interpolated between the checkpoints
    around the first crossing (step 0 not assumed); None when it never does."""
    points = sorted(curve.items())
    sign = 1.0 if higher_is_better else -1.0
    previous = None
    for step, value in points:
        if sign * (value - threshold) >= 0:
            if previous is None:
                return float(step)
            step0, value0 = previous
            return step0 + (step - step0) * (threshold - value0) / (value - value0)
        previous = (step, value)
    return None


def mean_spread(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation, count) of the values that are not None (spread None for < 2)."""
    present = [v for v in values if v is not None]
    if not present:
        return None, None, 0
    spread = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), spread, len(present)


def summarise(ladder: Ladder, runs: list[LadderRun], scores: dict) -> list[dict[str, Any]]:
    """One row per rung: steps, FLOPs, final quality and steps (and FLOPs) to the thresholds, as
    mean and spread over seeds, and the ratio of steps-to-threshold FLOPs to the reference rung's."""
    rows = []
    for rung in ladder.rungs:
        mine = [r for r in runs if r.rung == rung.name]
        if not mine:
            continue
        row: dict[str, Any] = {
            "rung": rung.name,
            "paper": rung.paper,
            "steps": mine[0].steps,
            "flops_per_step": mine[0].flops_per_step,
            "seeds": [r.seed for r in mine],
        }
        curves = [scores.get(r.name, {}) for r in mine]
        finals = [c[max(c)] if c else None for c in curves]
        for metric in ("recognised", "frechet"):
            row[f"final_{metric}"] = mean_spread([f[metric] if f else None for f in finals])
        thresholds = {"recognised": (ladder.threshold_recognised, True)}
        if ladder.threshold_frechet is not None:
            thresholds["frechet"] = (ladder.threshold_frechet, False)
        for metric, (threshold, higher) in thresholds.items():
            reached = [
                steps_to_threshold({s: v[metric] for s, v in c.items()}, threshold, higher) for c in curves
            ]
            row[f"steps_to_{metric}"] = mean_spread(reached)
            row[f"flops_to_{metric}"] = mean_spread(
                [s * mine[0].flops_per_step if s else None for s in reached]
            )
        rows.append(row)
    reference = next((r for r in rows if r["rung"] == ladder.reference), None)
    for row in rows:
        for metric in ("recognised", "frechet"):
            key = f"flops_to_{metric}"
            ours, theirs = row.get(key, (None,))[0], (reference or {}).get(key, (None,))[0]
            row[f"ratio_{metric}"] = ours / theirs if ours and theirs else None
            if theirs and key in row and row[key][2] == 0:  # no seed reached it within the budget
                row[f"ratio_{metric}_above"] = row["steps"] * row["flops_per_step"] / theirs
    return rows


def _cell(value: tuple | float | None, fmt: str) -> str:
    if isinstance(value, tuple):
        mean, spread, count = value
        if mean is None:
            return "not reached"
        text = format(mean, fmt) + (f" ± {format(spread, fmt)}" if spread is not None else "")
        return text + (f" ({count} seed{'s' if count > 1 else ''})" if count and count < 3 else "")
    return "-" if value is None else format(value, fmt)


def _ratio(row: dict[str, Any], metric: str) -> str:
    above = row.get(f"ratio_{metric}_above")
    return f"> {above:.2f}" if above is not None else _cell(row[f"ratio_{metric}"], ".2f")


def markdown_table(ladder: Ladder, rows: list[dict[str, Any]]) -> str:
    """The results as markdown: quality at the end, steps to the threshold, the FLOPs ratio to the
    reference rung (`> x` when no seed reached the threshold: x is the budget over the reference's
    FLOPs to it) next to the paper's ratio and FID at 400K steps."""
    lines = [
        f"Ladder `{ladder.name}`: equal training FLOPs ({ladder.reference} trains {ladder.reference_steps} steps), "
        f"mean ± standard deviation over seeds; threshold: recognised >= {ladder.threshold_recognised:.0%}"
        + (f", Frechet <= {ladder.threshold_frechet:g}" if ladder.threshold_frechet is not None else "")
        + ".",
        "",
        "| rung | steps | recognised (end) | Frechet (end) | steps to threshold | FLOPs ratio to "
        f"{ladder.reference} | paper's ratio | paper | paper FID-50K at 400K |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    frechet = ladder.threshold_frechet is not None
    if frechet:  # two more columns: steps and ratio to the Frechet threshold
        lines[-2] = lines[-2][:-1] + " steps to Frechet threshold | FLOPs ratio (Frechet) |"
        lines[-1] += "---|---|"
    for row in rows:
        paper_fid = PAPER_FID_400K.get(row["paper"])
        lines.append(
            f"| {row['rung']} | {row['steps']} | {_cell(row['final_recognised'], '.1%')} | "
            f"{_cell(row['final_frechet'], '.2f')} | {_cell(row['steps_to_recognised'], '.0f')} | "
            f"{_ratio(row, 'recognised')} | {PAPER_RATIO.get(row['paper'], '-')} | {row['paper'] or '-'} | "
            f"{paper_fid if paper_fid is not None else '-'} |"
            + (f" {_cell(row['steps_to_frechet'], '.0f')} | {_ratio(row, 'frechet')} |" if frechet else "")
        )
    lines += [
        "",
        "The paper (FiTv2, ImageNet 256): FiTv2 converges about 2x faster than FiT and about 2.5-3.5x faster "
        "than SiT; a ratio of 2 here says the rung needs twice FiTv2's training FLOPs to reach the threshold.",
    ]
    return "\n".join(lines) + "\n"


def report(ladder: Ladder, runs: list[LadderRun], docs: Path, jobs: int = 1) -> list[dict[str, Any]]:
    """Score (`jobs` checkpoints at a time), summarise and write `<docs>/results.json` (runs, curves,
    rows) and `<docs>/table.md`."""
    scores = score_runs(ladder, runs, jobs)
    rows = summarise(ladder, runs, scores)
    docs.mkdir(parents=True, exist_ok=True)
    payload = {
        "ladder": ladder.name,
        "runs": [{**asdict(r), "quality": scores.get(r.name, {})} for r in runs],
        "rungs": rows,
    }
    (docs / "results.json").write_text(json.dumps(payload, indent=1))
    (docs / "table.md").write_text(markdown_table(ladder, rows))
    return rows


def main(argv: list[str] | None = None) -> None:
    """`plan`, `train` or `report` a ladder file; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("plan", "train", "report"))
    parser.add_argument("ladder", type=Path)
    parser.add_argument("--rungs", nargs="+", help="only these rungs (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds (default: the file's)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs trained (`train`) or checkpoints scored (`report`) at once"
    )
    parser.add_argument("--docs", type=Path, default=Path("docs/ladder"), help="where `report` writes")
    parser.add_argument(
        "--reference-steps", type=int, help="a shorter (or longer) ladder; needs its own --out-dir"
    )
    parser.add_argument("--out-dir", help="run folders and the score cache (default: the file's out_dir)")
    args = parser.parse_args(argv)
    ladder = load_ladder(args.ladder)
    if args.reference_steps is not None:
        if args.out_dir is None or Path(args.out_dir).resolve() == Path(ladder.out_dir).resolve():
            raise UserError(
                f"--reference-steps {args.reference_steps} changes every run's steps: give it an --out-dir "
                f"other than {ladder.out_dir}, whose runs were planned for {ladder.reference_steps}"
            )
        ladder = Ladder(**{**vars(ladder), "reference_steps": args.reference_steps})
    if args.out_dir is not None:
        ladder = Ladder(**{**vars(ladder), "out_dir": args.out_dir})
    runs = plan_ladder(ladder, args.rungs, args.seeds)
    if args.action == "plan":
        for run in runs:
            state = "done" if run_done(run) else "pending"
            print(
                f"{run.name:24s} steps {run.steps:6d}  checkpoint every {run.interval:5d}  "
                f"{run.flops_per_step * run.steps:.3e} FLOPs  {state}"
            )
    elif args.action == "train":
        for name, seconds in train_ladder(ladder, runs, args.jobs).items():
            print(f"{name}: trained in {seconds:.0f} s")
    else:
        rows = report(ladder, runs, args.docs, args.jobs)
        print(markdown_table(ladder, rows), end="")
        not_finite = [
            r["rung"]
            for r in rows
            if r["final_frechet"][0] is not None and not math.isfinite(r["final_frechet"][0])
        ]
        if not_finite:
            print(f"warning: Frechet distance not finite for {not_finite}")


if __name__ == "__main__":
    try:
        main()
    except (UserError, FileNotFoundError, RuntimeError) as failure:
        sys.exit(f"ladder_study: {failure}")
