"""What a resumed run may change in its config, and the check that enforces it.

A run resumed from a checkpoint continues the run that wrote it. The fields in `FIXED` decide
what the saved state means (the network the weights belong to, the dataset and sample order the
data position indexes, the seed every step's noise is drawn from, the parameter groups the
optimizer state is keyed by, the checkpoint's format); a change to one of them is refused before
anything is loaded, naming the field and both values. Every other field may change and takes
effect from the first resumed step: the learning rate and its schedule, `train.steps`, clipping,
the EMA's decay, logging, checkpoint and validation cadence, data loading and batch shape,
parallelism and launch resources. Each change is reported (`config_changed` events in
`metrics.jsonl`). `NOT_COMPARED` fields say where and how to resume, not what the run is.

The saved config is the one each checkpoint records in its `fitscale.json` (`"config"`); for
checkpoints written before it did, the run folder's `config.yaml` (the config of the latest start).
The rules, written out for users, are in docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitscale.checkpoint.layout import complete_steps, read_metadata, resume_step, step_dirname
from fitscale.config import RunConfig
from fitscale.config.errors import ConfigError
from fitscale.config.model import build_config

log = logging.getLogger("fitscale.train")

# Field (or section prefix) -> why it may not change on resume. `model.*` are the resolved
# ModelConfig fields (preset plus overrides), so an override that restates a default is no change.
FIXED: dict[str, str] = {
    "model": "the checkpoint's weights belong to that network",
    "data.path": "the saved data position indexes that dataset",
    "data.remote": "the saved data position indexes that dataset",
    "data.num_classes": "the label embedding has that many classes",
    "data.seed": "the sample order is drawn from it",
    "data.shuffle": "the sample order depends on it",
    "train.seed": "every step's noise and label dropout are drawn from it",
    "train.trainable": "the optimizer state holds exactly those parameters",
    "optim.no_weight_decay": "the optimizer state is grouped by it",
    "optim.ema.enabled": "the checkpoint holds an EMA only when it was on",
    "parallel.backend": "FSDP and DeepSpeed write different checkpoints",
    "train.repa.encoder": "the checkpoint's REPA projector maps to that encoder's width",
    "train.repa.encoder_args": "the checkpoint's REPA projector maps to that encoder's width",
    "train.repa.projector_width": "the checkpoint's REPA projector has that shape",
    "train.repa.projector_depth": "the checkpoint's REPA projector has that shape",
}  # and the fields of the run's backend (ParallelBackend.fixed_on_resume)
# train.ddpm fields that define what a `model.objective=ddpm` network computes (a flow model ignores
# the section). sigma_small only picks the fixed sampling variance (not trained; ignored with learned
# variances), use_kl and rescale_learned_sigmas only weigh the loss terms: those may change.
DDPM_FIXED: dict[str, str] = {
    "train.ddpm.noise_schedule": "the network learned that schedule's noise levels",
    "train.ddpm.diffusion_steps": "the network reads timestep indices in [0, diffusion_steps)",
    "train.ddpm.predict_xstart": "it decides whether the network predicts x_0 or the noise",
}
# Model fields that change how the same function is computed or trained, not the network.
# class_dropout_prob and null_class may change while the label table keeps its rows (`label_rows_problem`).
MODEL_MAY_CHANGE = ("model.attn_backend", "model.class_dropout_prob", "model.null_class")
NOT_COMPARED = ("train.run_dir", "train.resume", "checkpoint.folder")


@dataclass(frozen=True)
class ConfigChange:
    """One field whose value differs from the config the checkpoint was trained with."""

    field: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.field} {self.old!r} -> {self.new!r}"


def fixed_reason(field: str, config: dict[str, Any]) -> str | None:
    """Why `field` may not change on resume, or None when it may."""
    if field in MODEL_MAY_CHANGE:
        return None
    from fitscale.parallel.backend import BACKENDS  # lazy: heavy

    backend = BACKENDS.get(config.get("parallel.backend"))
    if backend is not None and field in backend.fixed_on_resume:
        return backend.fixed_on_resume[field]
    if config.get("model.objective") == "ddpm" and field in DDPM_FIXED:
        return DDPM_FIXED[field]
    for prefix, reason in FIXED.items():
        if field == prefix or field.startswith(prefix + "."):
            return reason
    return None


def comparable(config: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """A config as {dotted field: JSON value}, with `model` resolved to its ModelConfig fields."""

    tree = dataclasses.asdict(config) if isinstance(config, RunConfig) else config
    tree = json.loads(json.dumps(tree))  # tuples -> lists, as a checkpoint's JSON holds them
    model = tree.pop("model")
    overrides = dict(model.get("overrides") or {})
    try:
        resolved = dataclasses.asdict(build_config(model["name"], **overrides))
    except (TypeError, ValueError):  # a preset or field this version does not know: compare as written
        resolved = {"overrides": overrides}
    flat = {"model.name": model["name"]}
    flat.update({f"model.{k}": v for k, v in json.loads(json.dumps(resolved)).items()})
    _flatten(tree, "", flat)
    return {k: v for k, v in flat.items() if k not in NOT_COMPARED}


def _flatten(tree: dict[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name != "launch.sbatch":
            _flatten(value, name + ".", out)
        else:
            out[name] = value


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[ConfigChange]:
    """Fields of two `comparable` configs that differ, in the current config's order."""
    fields = list(current) + [k for k in saved if k not in current]
    return [ConfigChange(f, saved.get(f), current.get(f)) for f in fields if saved.get(f) != current.get(f)]


def check_resume(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> list[ConfigChange]:
    """The changes from `saved` to `current`; ConfigError naming every change that is not allowed."""
    changes = config_changes(saved, current)
    refused = [(change, fixed_reason(change.field, saved)) for change in changes]
    refused = [(change, reason) for change, reason in refused if reason is not None]
    if refused:
        listed = "; ".join(
            f"{c.field} was {c.old!r} and is now {c.new!r} ({reason})" for c, reason in refused
        )
        raise ConfigError(
            f"cannot resume {checkpoint} with this config: {listed}. Set it back to resume, or start a new run "
            "with another train.run_dir"
        )
    return changes


def saved_config(checkpoint: Path, run_dir: Path) -> dict[str, Any] | None:
    """The config `checkpoint` was trained with: its own record, else the run folder's config.yaml."""

    recorded = read_metadata(checkpoint).get("config")
    if recorded is not None:
        return recorded
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


def resume_changes(config: RunConfig, checkpoint: Path) -> list[ConfigChange]:
    """Check `config` against the config `checkpoint` was trained with (see the module docstring)."""
    saved = saved_config(checkpoint, Path(config.train.run_dir))
    if saved is None:
        log.warning("%s records no config; resuming without checking what changed", checkpoint)
        return []
    changes = check_resume(comparable(saved), comparable(config), checkpoint)
    problem = label_rows_problem(config, checkpoint)
    if problem:
        raise ConfigError(problem)
    return changes


LABEL_TABLE = "model.y_embedder.embedding_table.weight"  # its DCP key


def label_rows_problem(config: RunConfig, checkpoint: Path) -> str | None:
    """Why the label table of `checkpoint` cannot load into the run's model, or None.

    The null-class row exists only when class_dropout_prob > 0 (the release's rule) unless
    `model.null_class` says otherwise; checkpoints written before that rule kept it at 0 too.
    Read from the DCP metadata (no tensor is loaded); a checkpoint without the entry (DeepSpeed's
    weights live in its own files) is not checked here.
    """
    from torch.distributed.checkpoint import FileSystemReader  # lazy: heavy

    try:
        entry = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata.get(LABEL_TABLE)
    except (FileNotFoundError, OSError, ValueError, EOFError):
        return None
    if entry is None:
        return None
    model = config.model_config()
    rows, wanted = int(entry.size[0]), model.num_classes + int(model.has_null_class)
    if rows == wanted:
        return None
    if rows > wanted:
        fix = "model.overrides.null_class=true"
    else:
        fix = (
            "model.overrides.class_dropout_prob=0"
            if model.class_dropout_prob > 0
            else "model.overrides.null_class=false"
        )
    return (
        f"cannot resume {checkpoint}: its label table has {rows} rows and the model builds {wanted} "
        f"(model.class_dropout_prob={model.class_dropout_prob}, model.null_class={model.null_class}); "
        f"set {fix} to resume it"
    )


def check_before_start(config: RunConfig) -> list[ConfigChange]:
    """`resume_changes` for the checkpoint `train.resume` picks, before any process starts ([] if none)."""

    folder = Path(config.train.run_dir) / config.checkpoint.folder
    step = resume_step(complete_steps(folder) if folder.is_dir() else [], config.train.resume, folder)
    return [] if step is None else resume_changes(config, folder / step_dirname(step))


def report_changes(changes: list[ConfigChange], step: int, metrics) -> None:
    """Each change as a `config_changed` event: a line in `metrics.jsonl` and a log line on rank 0."""
    for change in changes:
        metrics.event("config_changed", step, field=change.field, old=change.old, new=change.new)


RESTART_COUNTS = ("SLURM_RESTART_COUNT", "TORCHELASTIC_RESTART_COUNT")  # > 0: the same job started again


def resume_on_restart(resume: str, folder: Path, environ: dict[str, str]) -> str:
    """The `train.resume` a start of the run should use: `resume` itself, except on a restart of
    the same job (SLURM requeue after preemption or a time limit, a torchrun restart: `environ`
    counts it, RESTART_COUNTS) of a run started with `train.resume=S` whose newest complete
    checkpoint in `folder` is later than S and was written by a run resumed from S; then `auto`.

    The job's config still says `train.resume=S`, but its first start already branched from S; a
    restart resuming from S again would move that branch's checkpoints aside and redo its steps,
    at every preemption. A restart whose branch has no later checkpoint yet resumes from S as
    asked (S is then the newest step anyway, or the first start died before it branched).
    """

    if not str(resume).isdigit() or not any(
        environ.get(name, "0") not in ("", "0") for name in RESTART_COUNTS
    ):
        return resume
    steps = complete_steps(folder)
    if not steps or steps[-1] <= int(resume):
        return resume
    newest = folder / step_dirname(steps[-1])
    try:
        written_with = read_metadata(newest).get("config", {}).get("train", {}).get("resume")
    except (FileNotFoundError, ValueError):
        return resume
    if str(written_with) != str(resume):
        return resume
    log.info(
        "restart of a job started with train.resume=%s: its branch reached %s, resuming from there "
        "(train.resume=auto for this start)",
        resume,
        newest.name,
    )
    return "auto"
