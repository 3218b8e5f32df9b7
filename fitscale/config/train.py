"""The training section: run folder, length, resume policy, objective and robustness limits.

Fields are plain typed values so OmegaConf can check recipes and `--set` overrides against
them; `__post_init__` rejects values that are wrong on their own, and `RunConfig.validate`
checks the rules that involve other sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fitscale.config.errors import ConfigError
from fitscale.config.repa import RepaConfig
from fitscale.config.schema import check_choices


@dataclass
class FlowConfig:
    """Rectified flow: x_t = t x_1 + (1 - t) x_0 with t = 1 the clean data, velocity target."""

    timesteps: Literal["logit_normal", "uniform"] = "logit_normal"
    """How t is drawn per image: `logit_normal` (t = sigmoid(u), u ~ N(mean, std)) or `uniform`."""
    logit_mean: float = 0.0
    """Mean of u for `logit_normal`."""
    logit_std: float = 1.0
    """Standard deviation of u for `logit_normal`."""
    time_shift: float = 1.0
    """t <- s t / (1 + (s - 1) t) after sampling; 1 is the identity, s < 1 spends more steps near noise."""
    loss_weighting: Literal["uniform", "tokens"] = "uniform"
    """`uniform`: every image weighs the same (the release); `tokens`: weight n_tokens / reference_tokens."""
    reference_tokens: int = 256
    """Token count that gets weight 1 under `loss_weighting: tokens`."""

    def __post_init__(self) -> None:
        check_choices(self, "train.flow.")
        if not self.logit_std > 0:
            raise ConfigError(f"train.flow.logit_std: must be > 0, got {self.logit_std}")
        if not self.time_shift > 0:
            raise ConfigError(
                f"train.flow.time_shift: must be > 0 (1 disables the shift), got {self.time_shift}"
            )
        if self.reference_tokens < 1:
            raise ConfigError(f"train.flow.reference_tokens: must be >= 1, got {self.reference_tokens}")


@dataclass
class TrainConfig:
    """One run: where it lives, how long it trains, how it starts and what it tolerates."""

    run_dir: str = "runs/default"
    """Folder of the run: checkpoints, metrics.jsonl, the resolved config and the run lock."""
    steps: int = 1000
    """Optimizer steps of the whole run (a resumed run continues up to this number)."""
    seed: int = 0
    """Seeds weights, noise and timesteps; each rank's torch RNG gets seed + rank."""
    resume: str = "auto"
    """`auto`: continue from the newest complete checkpoint if any; `never`: refuse a folder that has
    checkpoints; or a step number to resume from that checkpoint."""
    init_from: str | None = None
    """Weights to start a fresh run from: a released FiTv2 checkpoint or a `fitscale convert export`
    file (.safetensors/.bin/.pt), or a checkpoint of another run of either backend (its folder,
    `checkpoints` folder or a step-N folder), whose EMA, if it kept one, the EMA continues from.
    Ignored when resuming."""
    trainable: list[str] = field(default_factory=list)
    """Name patterns (fnmatch, e.g. `x_embedder.*`, `*.bias`) of the parameters to train; empty trains
    everything. Parameters that match none stay frozen and bit-identical."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    max_nonfinite_steps: int = 20
    """Stop the run after this many consecutive steps with a NaN/inf loss or gradient (each is skipped)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` (CUDA when available, else CPU), `cpu` or `cuda`."""
    cuda_graphs: bool = False
    """Replay each compiled block as a CUDA graph (torch.compile "reduce-overhead"): needs one GPU,
    `parallel.compile` and `data.pad_to_budget`; every forward then gets one segment count and one
    `max_seqlen` (zero-length segments appended, fitscale/train/cuda_graphs.py)."""
    val_every: int = 0
    """Score the held-out split (`data.val_path`) every this many steps and at the last step, for the
    weights and the EMA (`val_loss`, `val_loss_ema` in metrics.jsonl); 0 turns it off. Every image
    is scored at a fixed grid of timesteps with fixed noise (fitscale.train.validation), so the
    numbers compare across runs, model sizes and world sizes."""
    val_max_images: int | None = None
    """Score only the first N images of the split in its stored order (all by default). A split written
    from class folders is stored class by class, so a prefix covers the first classes only."""
    val_seed: int = 0
    """Seed of the validation noise, independent of `seed`: runs with different seeds share it."""
    sample_every: int = 0
    """Draw a grid of samples every this many steps and at the last step, from fixed noise with the EMA
    weights (the raw weights without an EMA), to `<run_dir>/samples/step-N.png` and wandb; 0 turns it
    off. Training is unchanged by it, bit for bit (fitscale.train.previews)."""
    sample_labels: list[int] = field(default_factory=list)
    """Classes of the grid's rows; empty takes up to 10 classes spread evenly over the label range."""
    sample_grids: list[str] = field(default_factory=list)
    """Sizes of the grid's columns as `ROWSxCOLS` in tokens, e.g. [16x16, 8x16, 20x20]; empty takes the
    largest trained square, a wide and a tall half, and one square 1.25x beyond the training grid."""
    sample_cfg_scale: float = 4.0
    """Classifier-free guidance scale of the grid (1 = none)."""
    sample_sampler: str = "heun"
    """ODE solver of the grid: euler, heun, dopri5 or another of fitscale.flow.samplers.SAMPLERS
    (`sample_steps` counts the steps of the grid samplers; the adaptive ones pick their own)."""
    sample_steps: int = 20
    """Steps of the grid's euler / heun solver."""
    sample_vae: str | None = None
    """Local AutoencoderKL folder to decode the grid with (rank 0); None shows a latent channel in grey
    (the dataset's `preview_channel`, else 0)."""
    flow: FlowConfig = field(default_factory=FlowConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)

    def __post_init__(self) -> None:
        check_choices(self, "train.")
        if not self.run_dir:
            raise ConfigError("train.run_dir: must name a folder, e.g. --set train.run_dir=runs/my_run")
        if self.steps < 1:
            raise ConfigError(f"train.steps: must be >= 1, got {self.steps}")
        if self.resume not in ("auto", "never") and not str(self.resume).isdigit():
            raise ConfigError(
                f"train.resume: {self.resume!r} is not `auto`, `never` or a step number such as 1000"
            )
        if self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip: must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"train.max_nonfinite_steps: must be >= 1, got {self.max_nonfinite_steps}")
        if self.val_every < 0:
            raise ConfigError(f"train.val_every: must be >= 0 (0 turns validation off), got {self.val_every}")
        if self.val_max_images is not None and self.val_max_images < 1:
            raise ConfigError(
                f"train.val_max_images: must be >= 1 (or null for the whole split), got {self.val_max_images}"
            )
        if self.sample_every < 0:
            raise ConfigError(f"train.sample_every: must be >= 0 (0 turns it off), got {self.sample_every}")
        for grid in self.sample_grids:
            parse_grid(grid)
        if self.sample_cfg_scale < 0:
            raise ConfigError(
                f"train.sample_cfg_scale: must be >= 0 (1 = no guidance), got {self.sample_cfg_scale}"
            )
        if self.sample_steps < 1:
            raise ConfigError(f"train.sample_steps: must be >= 1, got {self.sample_steps}")
        if self.sample_every > 0:
            from fitscale.flow.samplers import SAMPLERS

            if self.sample_sampler not in SAMPLERS:
                raise ConfigError(
                    f"train.sample_sampler: {self.sample_sampler!r} is not one of {', '.join(SAMPLERS)}"
                )


def parse_grid(text: str) -> tuple[int, int]:
    """`"16x8"` -> (16, 8): a grid of rows x cols tokens (`train.sample_grids`); ConfigError otherwise."""
    rows, sep, cols = str(text).lower().partition("x")
    if not (sep and rows.strip().isdigit() and cols.strip().isdigit() and int(rows) > 0 and int(cols) > 0):
        raise ConfigError(f"train.sample_grids: {text!r} is not ROWSxCOLS in tokens, e.g. 16x16")
    return int(rows), int(cols)
