"""The training section: run folder, length, resume policy, objective and robustness limits.

Fields are plain typed values so OmegaConf can check recipes and `--set` overrides against
them; `__post_init__` rejects values that are wrong on their own, and `RunConfig.validate`
checks the rules that involve other sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fitscale.config.bounds import bound
from fitscale.config.ddpm import DdpmConfig
from fitscale.config.errors import ConfigError
from fitscale.config.repa import RepaConfig
from fitscale.config.schema import check_choices

# The ODE samplers of fitscale.flow.samplers.SAMPLERS, fixed-grid then adaptive (a test keeps them equal).
SamplerName = Literal[
    "euler", "heun", "midpoint", "rk4", "heun2", "heun3", "implicit_adams",
    "dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun",
]  # fmt: skip
# The grid's sampler: an ODE sampler for flow models, the release's ancestral `ddpm` for ddpm models.
PreviewSampler = Literal[SamplerName, "ddpm"]


@dataclass
class FlowConfig:
    """Rectified flow: x_t = t x_1 + (1 - t) x_0 with t = 1 the clean data, velocity target."""

    timesteps: Literal["logit_normal", "uniform"] = "logit_normal"
    """How t is drawn per image: `logit_normal` (t = sigmoid(u), u ~ N(mean, std)) or `uniform`."""
    logit_mean: float = 0.0
    """Mean of u for `logit_normal`."""
    logit_std: float = field(default=1.0, metadata=bound(0, low_open=True))
    """Standard deviation of u for `logit_normal`."""
    time_shift: float = field(default=1.0, metadata=bound(0, low_open=True, meaning="1 disables the shift"))
    """t <- s t / (1 + (s - 1) t) after sampling; 1 is the identity, s < 1 spends more steps near noise."""
    loss_weighting: Literal["uniform", "tokens"] = "uniform"
    """`uniform`: every image weighs the same (the release); `tokens`: weight n_tokens / reference_tokens."""
    reference_tokens: int = field(default=256, metadata=bound(1))
    """Token count that gets weight 1 under `loss_weighting: tokens`."""

    def __post_init__(self) -> None:
        check_choices(self, "train.flow.")


@dataclass
class TrainConfig:
    """One run: where it lives, how long it trains, how it starts and what it tolerates."""

    run_dir: str = "runs/default"
    """Folder of the run: checkpoints, metrics.jsonl, the resolved config and the run lock."""
    steps: int = field(default=1000, metadata=bound(1))
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
    grad_clip: float = field(default=1.0, metadata=bound(0, meaning="0 disables clipping"))
    """Clip the global gradient norm to this value; 0 disables clipping (the norm is still logged)."""
    max_nonfinite_steps: int = field(default=20, metadata=bound(1))
    """Stop the run after this many consecutive steps with a NaN/inf loss or gradient (each is skipped)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` (CUDA when available, else CPU), `cpu` or `cuda`."""
    cuda_graphs: bool = False
    """Replay each compiled block as a CUDA graph (torch.compile "reduce-overhead"): needs one GPU,
    `parallel.compile` and `data.pad_to_budget`; every forward then gets one segment count and one
    `max_seqlen` (zero-length segments appended, fitscale/parallel/cuda_graphs.py)."""
    val_every: int = field(default=0, metadata=bound(0, meaning="0 turns validation off"))
    """Score the held-out split (`data.val_path`) every this many steps and at the last step, for the
    weights and the EMA (`val_loss`, `val_loss_ema` in metrics.jsonl); 0 turns it off. Every image
    is scored at a fixed grid of timesteps with fixed noise (fitscale.train.validation), so the
    numbers compare across runs, model sizes and world sizes."""
    val_max_images: int | None = field(default=None, metadata=bound(1, meaning="or null for the whole split"))
    """Score only the first N images of the split in its stored order (all by default). A split written
    from class folders is stored class by class, so a prefix covers the first classes only."""
    val_seed: int = 0
    """Seed of the validation noise, independent of `seed`: runs with different seeds share it."""
    sample_every: int = field(default=0, metadata=bound(0, meaning="0 turns it off"))
    """Draw a grid of samples every this many steps and at the last step, from fixed noise with the EMA
    weights (the raw weights without an EMA), to `<run_dir>/samples/step-N.png` and wandb; 0 turns it
    off. Training is unchanged by it, bit for bit (fitscale.train.previews)."""
    sample_labels: list[int] = field(default_factory=list)
    """Classes of the grid's rows; empty takes up to 10 classes spread evenly over the label range."""
    sample_grids: list[str] = field(default_factory=list)
    """Sizes of the grid's columns as `ROWSxCOLS` in tokens, e.g. [16x16, 8x16, 20x20]; empty takes the
    largest trained square, a wide and a tall half, and one square 1.25x beyond the training grid."""
    sample_cfg_scale: float = field(default=4.0, metadata=bound(0, meaning="1 = no guidance"))
    """Classifier-free guidance scale of the grid (1 = none)."""
    sample_sampler: PreviewSampler = "heun"
    """ODE solver of the grid: euler, heun, dopri5 or another of fitscale.flow.samplers.SAMPLERS
    (`sample_steps` counts the steps of the grid samplers; the adaptive ones pick their own); `ddpm`
    (the release's ancestral sampler, `sample_steps` respaced steps) for model.objective=ddpm."""
    sample_steps: int = field(default=20, metadata=bound(1))
    """Steps of the grid's euler / heun solver."""
    sample_vae: str | None = None
    """Local AutoencoderKL folder to decode the grid with (rank 0); None shows a latent channel in grey
    (the dataset's `preview_channel`, else 0)."""
    flow: FlowConfig = field(default_factory=FlowConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    ddpm: DdpmConfig = field(default_factory=DdpmConfig)

    def __post_init__(self) -> None:
        check_choices(self, "train.")
        if not self.run_dir:
            raise ConfigError("train.run_dir: must name a folder, e.g. --set train.run_dir=runs/my_run")
        if self.resume not in ("auto", "never") and not str(self.resume).isdigit():
            raise ConfigError(
                f"train.resume: {self.resume!r} is not `auto`, `never` or a step number such as 1000"
            )
        for grid in self.sample_grids:
            parse_grid(grid)


def parse_grid(text: str) -> tuple[int, int]:
    """`"16x8"` -> (16, 8): a grid of rows x cols tokens (`train.sample_grids`); ConfigError otherwise."""
    rows, sep, cols = str(text).lower().partition("x")
    if not (sep and rows.strip().isdigit() and cols.strip().isdigit() and int(rows) > 0 and int(cols) > 0):
        raise ConfigError(f"train.sample_grids: {text!r} is not ROWSxCOLS in tokens, e.g. 16x16")
    return int(rows), int(cols)
