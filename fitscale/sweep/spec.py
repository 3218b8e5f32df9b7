"""A scaling sweep as data: which model sizes, at which compute budgets or step counts, from one recipe.

A spec (YAML, see recipes/scaling/) names a base recipe and crosses model sizes with either
training-compute budgets (`mode: grid`: every size at every budget, which is also an isoFLOP
design), per-budget size lists (`mode: isoflop`), or step counts (`mode: steps`). `plan_sweep`
turns it into runs, each with its model, its steps, and its compute in two conventions:
- ours: `fitscale.models.flops.training_flops` (2 FLOPs per multiply-add, attention included,
  3x the forward) of `tokens_per_image`-token images, `global_batch_size` per step;
- the paper's: "GFLOPs" (multiply-adds of the linear layers of one 256-token image) x batch x
  steps x 3, the axis FiT/DiT plot against.
Budgets are in our convention (real FLOPs); steps are rounded to the nearest integer >= 1.

Learning rates: a spec's `lr` rule (base * (width / base_width) ** width_exponent, times each of
`multipliers`) or a model's own `lrs` list makes each (size, budget) a small learning-rate grid;
`fitscale sweep fit` keeps the run with the best validation loss of each. `held_out` runs train
and are scored like the others, but no fit sees them: `fit` compares them with its prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fitscale.config import load_config
from fitscale.config.model import ModelOverrides, PresetName, build_config
from fitscale.config.schema import check_choices, load_structured
from fitscale.errors import UserError
from fitscale.hardware import H100_BF16_PEAK


@dataclass
class SweepModel:
    """One model size of the sweep: a preset plus ModelConfig overrides, under a short name."""

    name: str
    preset: PresetName
    overrides: ModelOverrides = field(default_factory=ModelOverrides)  # or a dict of ModelConfig fields
    lrs: list[float] = field(default_factory=list)  # this model's learning-rate grid (else the spec's rule)

    def __post_init__(self) -> None:
        check_choices(self, f"model {self.name!r}: ")


@dataclass
class LRAxis:
    """Learning rates per model: base * (width / base_width) ** width_exponent, times each multiplier.

    width_exponent -1 is the muP-style rule for Adam's hidden matrices (lr proportional to 1 / width);
    0 gives every width the same grid."""

    base: float
    base_width: int = 0  # hidden size that `base` is tuned for (needed when width_exponent != 0)
    width_exponent: float = 0.0
    multipliers: list[float] = field(default_factory=lambda: [1.0])

    def __post_init__(self) -> None:
        if not self.base > 0 or any(not m > 0 for m in self.multipliers) or not self.multipliers:
            raise UserError(
                f"lr: base and multipliers must be > 0, got base {self.base}, multipliers {self.multipliers}"
            )
        if self.width_exponent and self.base_width < 1:
            raise UserError(
                f"lr: width_exponent {self.width_exponent} needs base_width (the hidden size `base` is tuned for)"
            )

    def centre(self, width: int) -> float:
        """The rule's rate for a model of hidden size `width` (multiplier 1)."""
        return (
            self.base * (width / self.base_width) ** self.width_exponent if self.width_exponent else self.base
        )

    def rates(self, width: int) -> list[float]:
        """The learning rates of a model of hidden size `width`: the rule's centre times each multiplier."""
        return [self.centre(width) * m for m in self.multipliers]


@dataclass
class HeldOutRun:
    """A run trained and scored with the sweep but left out of every fit, to test its predictions."""

    name: str
    preset: PresetName
    overrides: ModelOverrides = field(default_factory=ModelOverrides)  # or a dict of ModelConfig fields
    budget: float | None = None  # training FLOPs (ours); or
    steps: int | None = None
    lr: float | None = None  # default: the spec's rule at this width (multiplier 1), else the recipe's

    def __post_init__(self) -> None:
        check_choices(self, f"held_out {self.name!r}: ")
        if (self.budget is None) == (self.steps is None):
            raise UserError(f"held_out {self.name!r}: give exactly one of `budget` (FLOPs) or `steps`")
        if (self.budget is not None and not self.budget > 0) or (self.steps is not None and self.steps < 1):
            raise UserError(f"held_out {self.name!r}: budget must be > 0 and steps >= 1")
        if self.lr is not None and not self.lr > 0:
            raise UserError(f"held_out {self.name!r}: lr must be > 0, got {self.lr}")


@dataclass
class SweepSpec:
    """Everything `fitscale sweep` needs; loaded from YAML by `load_spec`."""

    name: str
    recipe: str  # base RunConfig recipe every run starts from
    out_dir: str  # each run trains in <out_dir>/<run name>
    models: list[SweepModel]
    mode: Literal["grid", "isoflop", "steps"] = "grid"
    budgets: list[float] = field(default_factory=list)  # training FLOPs (ours), modes grid / isoflop
    isoflop: dict[float, list[str]] = field(default_factory=dict)  # budget -> model names (mode isoflop)
    steps: list[int] = field(default_factory=list)  # mode steps
    global_batch_size: int | None = None  # default: the recipe's data.global_batch_size
    tokens_per_image: int = 256  # mean tokens of an image, for the FLOP count
    overrides: list[str] = field(default_factory=list)  # `section.field=value` for every run
    mfu: float = 0.4  # for the GPU-hour estimate
    peak_flops: float = H100_BF16_PEAK  # FLOP/s of one GPU
    validation: dict[str, Any] = field(default_factory=dict)  # ValidationSettings fields + val_path
    fid: dict[str, Any] = field(
        default_factory=dict
    )  # reference (ADM .npz), inception_weights, vae, num_images, cfg
    # fitscale.eval.digits_quality.QualitySettings fields: rows get digits_recognised, digits_frechet
    digits_quality: dict[str, Any] = field(default_factory=dict)
    lr: LRAxis | None = None  # learning-rate rule / grid; default: the recipe's optim.lr for every run
    held_out: list[HeldOutRun] = field(default_factory=list)  # trained, scored, never fitted
    # what `fit` fits; digits_error is 1 - digits_recognised
    metric: Literal[
        "auto", "val_loss_ema", "val_loss", "train_loss", "fid", "digits_frechet", "digits_error"
    ] = "auto"
    include_extrapolated: bool = False  # let isoFLOP optima outside the sizes tried into N*(C)

    def __post_init__(self) -> None:
        where = f"sweep {self.name!r}"
        check_choices(self, f"{where}: ")
        if not self.models:
            raise UserError(f"{where}: `models` is empty; list at least one {{name, preset}}")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise UserError(f"{where}: model names must be unique, got {names}")
        if self.mode == "grid" and not self.budgets:
            raise UserError(f"{where}: mode grid needs `budgets` (training FLOPs), e.g. [1e18, 3e18]")
        if self.mode == "steps" and not self.steps:
            raise UserError(f"{where}: mode steps needs `steps`, e.g. [1000, 2000]")
        if self.mode == "isoflop":
            if not self.isoflop:
                raise UserError(f"{where}: mode isoflop needs `isoflop`: {{budget: [model names]}}")
            for budget, chosen in self.isoflop.items():
                unknown = sorted(set(chosen) - set(names))
                if unknown:
                    raise UserError(f"{where}: isoflop budget {budget:g} names unknown models {unknown}")
        bad_budgets = [b for b in [*self.budgets, *self.isoflop] if not (math.isfinite(b) and b > 0)]
        if bad_budgets:
            raise UserError(f"{where}: budgets must be finite training FLOPs > 0, got {bad_budgets}")
        if any(s < 1 for s in self.steps):
            raise UserError(f"{where}: steps must be >= 1, got {self.steps}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise UserError(
                f"{where}: global_batch_size must be >= 1, got {self.global_batch_size} (leave it out for the recipe's)"
            )
        if not str(self.out_dir).strip():
            raise UserError(f"{where}: out_dir is empty; name the folder the runs train in")
        if Path(self.out_dir).exists() and not Path(self.out_dir).is_dir():
            raise UserError(f"{where}: out_dir {self.out_dir} is a file; name a folder for the runs")
        validation_settings(self)  # refused now, not after training
        if not 0 < self.mfu <= 1:
            raise UserError(f"{where}: mfu must be in (0, 1], got {self.mfu}")
        if self.tokens_per_image < 1:
            raise UserError(f"{where}: tokens_per_image must be >= 1")
        for model in self.models:
            if any(not lr > 0 for lr in model.lrs):
                raise UserError(f"{where}: model {model.name!r}: lrs must be > 0, got {model.lrs}")
        if self.digits_quality:
            from fitscale.eval.digits_quality import QualitySettings  # lazy: optional extra

            QualitySettings.from_dict(self.digits_quality, where)  # refused now, not after training
        clashes = sorted({h.name for h in self.held_out} & set(names))
        if clashes:
            raise UserError(f"{where}: held_out names {clashes} are also in `models`; name them apart")


def validation_settings(spec: SweepSpec):
    """The spec's `validation:` section (`val_path` aside) as fitscale.train.validation.ValidationSettings;
    UserError naming `validation.<key>` for an unknown key or a bad value."""
    from fitscale.train.validation import ValidationSettings  # lazy: heavy

    where = f"sweep {spec.name!r}: validation"
    known = ("max_images", "seed", "timesteps", "val_path")
    unknown = sorted(set(spec.validation) - set(known))
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}; known: {', '.join(known)}")
    values = {k: v for k, v in spec.validation.items() if k != "val_path"}
    if "timesteps" in values:
        if not isinstance(values["timesteps"], (list, tuple)):
            raise UserError(
                f"{where}.timesteps must be a list of times in [0, 1], got {values['timesteps']!r}"
            )
        values["timesteps"] = tuple(values["timesteps"])
    try:
        return ValidationSettings(**values)
    except (TypeError, ValueError) as error:  # its own message names the field
        raise UserError(f"sweep {spec.name!r}: {error}") from None


def load_spec(path: str | Path) -> SweepSpec:
    """A SweepSpec from YAML; relative `recipe` and `out_dir` stay relative to the working directory.

    FileNotFoundError names a missing file; every other problem is a one-line ConfigError (a
    ValueError), `sweep spec '<file>': <field>: <problem>` (fitscale.config.schema)."""
    return load_structured(SweepSpec, files=[("sweep spec", path)], source=f"sweep spec {str(path)!r}")


@dataclass
class PlannedRun:
    """One run of a sweep and what it costs."""

    name: str
    model: str
    preset: str
    overrides: dict[str, Any]
    parameters: int
    steps: int
    global_batch_size: int
    tokens_per_image: int
    flops_per_step: int  # ours: training FLOPs of one step
    paper_gflops: float  # the paper's per-image "GFLOPs"
    budget: float | None  # the budget it was planned for (grid / isoflop)
    width: int = 0  # hidden size
    lr: float | None = None  # optim.lr of this run (None: the recipe's)
    held_out: bool = False  # trained and scored, never fitted

    @property
    def tokens(self) -> float:
        """Training tokens D: steps x images per step x tokens per image."""
        return float(self.steps) * self.global_batch_size * self.tokens_per_image

    @property
    def training_flops(self) -> float:
        """Training FLOPs of the whole run (fitscale.models.flops convention: 3x forward, real tokens)."""
        return float(self.flops_per_step) * self.steps

    @property
    def paper_compute(self) -> float:
        """The paper's training compute: GFLOPs x batch x steps x 3 (in FLOPs, i.e. x 1e9)."""
        return self.paper_gflops * 1e9 * self.global_batch_size * self.steps * 3

    def gpu_hours(self, mfu: float, peak_flops: float) -> float:
        """GPU-hours at model FLOPs utilisation `mfu` of a GPU peak of `peak_flops` FLOP/s."""
        return self.training_flops / (mfu * peak_flops) / 3600

    def row(self, mfu: float, peak_flops: float) -> dict[str, Any]:
        """The run's row of `fitscale sweep plan`: name, model, parameters, steps, batch, budget, FLOPs,
        GPU-hours.
        """
        return {
            "run": self.name,
            "model": self.model,
            "preset": self.preset,
            "parameters": self.parameters,
            "steps": self.steps,
            "global_batch_size": self.global_batch_size,
            "tokens_per_image": self.tokens_per_image,
            "budget": self.budget,
            "paper_gflops": round(self.paper_gflops, 2),
            "paper_compute": self.paper_compute,
            "training_flops": self.training_flops,
            "ratio_real_to_paper": self.training_flops / self.paper_compute,
            "gpu_hours": self.gpu_hours(mfu, peak_flops),
            "width": self.width,
            "tokens": self.tokens,
            "lr": self.lr,
            "held_out": self.held_out,
        }


@dataclass(frozen=True)
class SweepBase:
    """What every run of a sweep takes from its recipe and the spec's `overrides` lines: the batch,
    and the model fields set there (a run trains the sweep model's preset with these fields, then
    the sweep model's own overrides on top: what `run_overrides` gives the trainer)."""

    batch: int
    model_overrides: dict[str, Any]  # recipe + the spec's `model.overrides.*` lines
    from_recipe: frozenset[str]  # of those, the fields only the recipe sets


def sweep_base(spec: SweepSpec) -> SweepBase:
    """The SweepBase of `spec` (reads the recipe). UserError naming the sweep for a bad recipe or line."""
    try:
        config = load_config(spec.recipe, spec.overrides)
    except ValueError as error:
        raise UserError(
            f"sweep {spec.name!r}: recipe {spec.recipe} with the spec's overrides: {error}"
        ) from None
    merged = dict(config.model.overrides)
    from_lines = {line.split("=", 1)[0].removeprefix("model.overrides.") for line in spec.overrides}
    return SweepBase(
        batch=int(spec.global_batch_size or config.data.global_batch_size),
        model_overrides=merged,
        from_recipe=frozenset(set(merged) - from_lines),
    )


def trained_model_config(spec: SweepSpec, model: SweepModel, base: SweepBase):
    """The ModelConfig `model` trains with in this sweep (its preset, the recipe's and the spec's model
    fields, its own overrides last).

    UserError when a field only the recipe sets changes the model's shape (its parameter count): a
    sweep model named for its width that silently trained at the recipe's width would be counted,
    fitted and reported as the wrong size. Fields that do not change the shape (an attention
    backend, dropout) pass, as do the spec's own `overrides` lines (meant for every run)."""
    from fitscale.models.flops import count_parameters  # lazy: heavy

    where = f"sweep {spec.name!r}, model {model.name!r}"
    effective = {**base.model_overrides, **model.overrides}
    try:
        config = build_config(model.preset, **effective)
        own = {k: v for k, v in effective.items() if k not in base.from_recipe or k in model.overrides}
        alone = build_config(model.preset, **own)
    except ValueError as error:
        raise UserError(f"{where}: {error}") from None
    if count_parameters(alone) != count_parameters(config):
        fields = sorted(k for k in base.from_recipe if k not in model.overrides)
        listed = ", ".join(f"model.overrides.{k}={base.model_overrides[k]!r}" for k in fields)
        raise UserError(
            f"{where}: the recipe {spec.recipe} sets {listed}, which would train this model with "
            f"{count_parameters(config):,} parameters instead of its preset's {count_parameters(alone):,}; "
            "set those fields in the model's own overrides (the recipe's values to keep them)"
        )
    return config


def plan_run(
    spec: SweepSpec,
    model: SweepModel,
    budget: float | None,
    steps: int | None,
    lr: float | None = None,
    suffix: str = "",
    held_out: bool = False,
    base: SweepBase | None = None,
) -> PlannedRun:
    """One run of `model` at `budget` FLOPs (steps = budget / FLOPs per step, >= 1) or `steps`, counted
    with the model it trains (`trained_model_config`)."""
    from fitscale.models.flops import count_parameters, paper_gflops, training_flops  # lazy: heavy

    base = base or sweep_base(spec)
    batch = base.batch
    config = trained_model_config(spec, model, base)
    per_step = training_flops(config, [spec.tokens_per_image] * batch)
    if steps is None:
        steps = max(1, round(budget / per_step))
        label = f"{model.name}-C{budget:.0e}".replace("+", "")
    else:
        label = f"{model.name}-s{steps}"
    return PlannedRun(
        name=label + suffix,
        model=model.name,
        preset=model.preset,
        overrides=dict(model.overrides),
        parameters=count_parameters(config),
        steps=int(steps),
        global_batch_size=batch,
        tokens_per_image=spec.tokens_per_image,
        flops_per_step=per_step,
        paper_gflops=paper_gflops(config, 256),
        budget=budget,
        width=int(config.hidden_size),
        lr=lr,
        held_out=held_out,
    )


def model_lrs(spec: SweepSpec, model: SweepModel, width: int) -> list[float | None]:
    """The learning rates `model` trains at: its own `lrs`, else the spec's rule, else the recipe's."""
    if model.lrs:
        return [float(lr) for lr in model.lrs]
    if spec.lr is not None:
        return spec.lr.rates(width)
    return [None]


def plan_sweep(spec: SweepSpec) -> list[PlannedRun]:
    """The runs of the sweep in a stable order (model, then budget or steps, then lr; held-out last)."""
    base = sweep_base(spec)
    by_name = {m.name: m for m in spec.models}
    combos: list[tuple[SweepModel, float | None, int | None]] = []
    if spec.mode == "grid":
        combos = [(m, b, None) for m in spec.models for b in spec.budgets]
    elif spec.mode == "isoflop":
        order = {m.name: i for i, m in enumerate(spec.models)}
        pairs = sorted(
            ((n, b) for b, names in spec.isoflop.items() for n in names), key=lambda p: (order[p[0]], p[1])
        )
        combos = [(by_name[n], b, None) for n, b in pairs]
    else:
        combos = [(m, None, s) for m in spec.models for s in spec.steps]
    runs = []
    for model, budget, steps in combos:
        first = plan_run(spec, model, budget, steps, base=base)
        lrs = model_lrs(spec, model, first.width)
        for lr in lrs:
            suffix = f"-lr{lr:.3g}" if len(lrs) > 1 else ""
            runs.append(plan_run(spec, model, budget, steps, lr, suffix, base=base))
    for held in spec.held_out:
        model = SweepModel(held.name, held.preset, dict(held.overrides))
        run = plan_run(spec, model, held.budget, held.steps, held_out=True, base=base)
        run.lr = held.lr if held.lr is not None else (spec.lr.centre(run.width) if spec.lr else None)
        runs.append(run)
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    clashes = sorted(name for name, count in seen.items() if count > 1)
    if clashes:
        raise UserError(
            f"sweep {spec.name!r}: runs {clashes} share a folder name (budgets equal to one significant "
            "digit, or learning rates to three); make them differ"
        )
    return runs


def run_overrides(spec: SweepSpec, run: PlannedRun) -> list[str]:
    """The `--set` list that turns the base recipe into this run."""
    overrides = [*spec.overrides, f"model.name={run.preset}", f"train.steps={run.steps}"]
    overrides += [f"model.overrides.{k}={v}" for k, v in run.overrides.items()]
    overrides += [f"data.global_batch_size={run.global_batch_size}", f"train.run_dir={run_dir(spec, run)}"]
    if run.lr is not None:
        overrides.append(f"optim.lr={run.lr!r}")
    return overrides


def run_dir(spec: SweepSpec, run: PlannedRun) -> Path:
    """The run folder of `run` in the sweep: `<out_dir>/<run name>`."""
    return Path(spec.out_dir) / run.name


def format_plan(rows: list[dict[str, Any]]) -> str:
    """The plan as an aligned text table."""
    header = (
        "run",
        "params",
        "steps",
        "batch",
        "paper GFLOPs",
        "paper C (GFxBxSx3)",
        "our FLOPs",
        "ours/paper",
        "GPU-h",
        "lr",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r["run"],
                f"{r['parameters'] / 1e6:.1f}M"
                if r["parameters"] >= 1e6
                else f"{r['parameters'] / 1e3:.0f}K",
                str(r["steps"]),
                str(r["global_batch_size"]),
                f"{r['paper_gflops']:.2f}",
                f"{r['paper_compute']:.3e}",
                f"{r['training_flops']:.3e}",
                f"{r['ratio_real_to_paper']:.2f}",
                f"{r['gpu_hours']:.1f}" if r["gpu_hours"] >= 0.1 else f"{r['gpu_hours']:.2g}",
                ("recipe" if r.get("lr") is None else f"{r['lr']:.3g}")
                + (" held-out" if r.get("held_out") else ""),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        for line in lines
    )


def total_gpu_hours(runs: list[PlannedRun], spec: SweepSpec) -> float:
    """GPU-hours of all `runs` at the spec's MFU and peak FLOP/s."""
    return math.fsum(run.gpu_hours(spec.mfu, spec.peak_flops) for run in runs)
