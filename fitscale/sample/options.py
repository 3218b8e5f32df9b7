"""How to sample: ODE or SDE, the solver and its settings, guidance, seed, batch size, compute dtype, and
the paper's training-free RoPE extrapolation methods as ModelConfig overrides."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from fitscale.config.ddpm import DdpmConfig
from fitscale.errors import UserError
from fitscale.flow.samplers import ADAPTIVE, FIXED_GRID, SAMPLERS, TOLERANCE_METHODS
from fitscale.flow.sde import DIFFUSION_FORMS, LAST_STEPS, SBDM_START, SDE_SAMPLERS

# The paper's training-free extrapolation methods as ModelConfig fields ("Vision" = decoupled axes).
EXTRAPOLATIONS = {
    "none": {"rope_method": "none", "rope_decoupled": False},
    "linear": {"rope_method": "linear", "rope_decoupled": False},
    "ntk": {"rope_method": "ntk", "rope_decoupled": False},
    "yarn": {"rope_method": "yarn", "rope_decoupled": False},
    "vision-ntk": {"rope_method": "ntk", "rope_decoupled": True},
    "vision-yarn": {"rope_method": "yarn", "rope_decoupled": True},
}


def extrapolation_overrides(method: str | None, attn_scale: bool = False) -> dict:
    """ModelConfig overrides for an extrapolation method (per-image frequencies, so every size in
    a packed batch gets its own); None keeps the model's own RoPE. Raises ValueError for an
    unknown name, listing the known ones."""
    if method is None:
        return {"rope_attn_scale": True} if attn_scale else {}
    if method not in EXTRAPOLATIONS:
        raise UserError(f"--extrapolation {method!r}: choose one of {', '.join(EXTRAPOLATIONS)}")
    return {
        **EXTRAPOLATIONS[method],
        "rope_attn_scale": attn_scale,
        "rope_per_image": True,
        "rope_target_grid": None,
    }


DDPM = "ddpm"  # the release's ancestral sampler of model.objective=ddpm models (fitscale.flow.ddpm)
DDPM_STEPS = 250  # the release's default --num-sampling-steps of sample_fit_ddp.py

# Options of one mode only: given with the other mode they are refused, not ignored.
ODE_FIELDS = {"sampler": "--sampler", "atol": "--atol", "rtol": "--rtol"}
SDE_FIELDS = {
    "sde_sampler": "--sde-sampler",
    "diffusion_form": "--diffusion-form",
    "diffusion_norm": "--diffusion-norm",
    "last_step": "--last-step",
    "last_step_size": "--last-step-size",
}


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> str:
    """`value` as one of `allowed` (matched ignoring case, as the release writes SBDM, Mean, Euler)."""
    lowered = str(value).lower()
    if lowered not in allowed:
        raise UserError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
    return lowered


@dataclass
class SamplingOptions:
    """How to integrate: ODE or SDE and their settings, guidance, seed and batch size.

    Fields left None take their mode's default (`mode="ode"`: euler, 50 steps, or atol 1e-6 /
    rtol 1e-3 for adaptive samplers; `mode="sde"`: the release's Euler-Maruyama, sigma diffusion,
    norm 1, last step `mean` of size 0.04, 50 steps). An option of the other mode, a step count
    for an adaptive sampler or a tolerance for a grid sampler is refused. Raises ValueError naming
    the command-line flag of a bad value and the allowed values.
    """

    mode: str = "ode"  # ode | sde
    sampler: str | None = None  # ODE: fitscale.flow.samplers.SAMPLERS (euler)
    steps: int | None = None  # steps of grid ODE samplers and of the SDE (50)
    atol: float | None = None  # adaptive ODE samplers (1e-6)
    rtol: float | None = None  # adaptive ODE samplers (1e-3)
    sde_sampler: str | None = None  # SDE: euler (Euler-Maruyama) | heun
    diffusion_form: str | None = None  # SDE: fitscale.flow.sde.DIFFUSION_FORMS (sigma)
    diffusion_norm: float | None = None  # SDE: scale of the diffusion coefficient (1)
    last_step: str | None = None  # SDE: mean | tweedie | euler | none (mean)
    last_step_size: float | None = None  # SDE: size of the last step (0.04)
    time_shift: float = 1.0  # sample on a shifted time grid (< 1: more steps near noise)
    cfg_scale: float = 1.0  # 1 = no guidance
    scale_pow: float = 0.0  # the release's guidance schedule over time; 0 = constant scale
    guidance_channels: int | None = None  # 3: the release's first-3-channels guidance
    seed: int = 0
    token_budget: int = 16384  # tokens per forward (guidance doubles a batch's tokens); packed batches only
    # True: every image is sampled alone, one forward per image (its guided pair in one forward), so its
    # arithmetic is the same whatever batch or rank draws it, bit for bit. False: images share packed
    # forwards up to `token_budget` (faster on accelerators; an image then moves with its batch mates
    # by ~1e-6 relative on grid samplers and up to the solver's tolerance on adaptive ones).
    batch_invariant: bool = True
    autocast: str = "auto"  # auto (bf16 on CUDA), bf16 or fp32
    ddpm: DdpmConfig | None = (
        None  # --sampler ddpm: the diffusion trained on (train.ddpm); None = the release's
    )

    def __post_init__(self) -> None:
        self.mode = _choice("--mode", self.mode, ("ode", "sde"))
        if self.mode == "ode":
            self._check_ode()
        else:
            self._check_sde()
        if self.steps is not None and self.steps < 1:
            raise UserError(f"--steps {self.steps}: must be >= 1")
        if self.time_shift <= 0:
            raise UserError(f"--time-shift {self.time_shift}: must be > 0")
        if self.cfg_scale < 0:
            raise UserError(f"--cfg {self.cfg_scale}: the guidance scale must be >= 0")
        if self.scale_pow < 0:
            raise UserError(f"--scale-pow {self.scale_pow}: must be >= 0 (0 = a constant guidance scale)")
        if self.guidance_channels is not None and self.guidance_channels < 1:
            raise UserError(f"guidance_channels {self.guidance_channels}: must be >= 1 (None = all channels)")
        if self.autocast not in ("auto", "bf16", "fp32"):
            raise UserError(f"--dtype {self.autocast!r}: choose auto, bf16 or fp32")

    def _refuse(self, fields: dict[str, str], mode: str) -> None:
        for name, flag in fields.items():
            if getattr(self, name) is not None:
                raise UserError(
                    f"{flag} applies to --mode {mode} only; drop it or add --mode {mode} (this run is --mode {self.mode})"
                )

    def _check_ode(self) -> None:
        self._refuse(SDE_FIELDS, "sde")
        self.sampler = _choice("--sampler", self.sampler or "euler", (*SAMPLERS, DDPM))
        if self.sampler == DDPM:
            self._check_ddpm()
            return
        if self.sampler in ADAPTIVE:
            if self.steps is not None:
                raise UserError(
                    f"--steps applies to grid samplers ({', '.join(FIXED_GRID)}); --sampler {self.sampler} "
                    "picks its own steps from --atol / --rtol"
                )
        elif self.steps is None:
            self.steps = 50
        if self.sampler in TOLERANCE_METHODS:
            self.atol = 1e-6 if self.atol is None else self.atol
            self.rtol = 1e-3 if self.rtol is None else self.rtol
            for flag, value in (("--atol", self.atol), ("--rtol", self.rtol)):
                if not value > 0:
                    raise UserError(f"{flag} {value}: a tolerance must be > 0")
        elif self.atol is not None or self.rtol is not None:
            flag = "--atol" if self.atol is not None else "--rtol"
            raise UserError(
                f"{flag} applies to samplers with an error control ({', '.join(TOLERANCE_METHODS)}); "
                f"--sampler {self.sampler} takes --steps"
            )

    def _check_ddpm(self) -> None:
        """The release's v1 sampler: --steps respaced steps (250), no tolerances, no time shift."""
        self.steps = DDPM_STEPS if self.steps is None else self.steps
        if self.steps < 2:
            raise UserError(f"--steps {self.steps}: --sampler ddpm needs at least 2 steps")
        if self.atol is not None or self.rtol is not None:
            flag = "--atol" if self.atol is not None else "--rtol"
            raise UserError(f"{flag} applies to samplers with an error control; --sampler ddpm takes --steps")
        if self.time_shift != 1.0:
            raise UserError(
                f"--time-shift {self.time_shift}: --sampler ddpm samples the trained schedule; drop it"
            )
        self.ddpm = self.ddpm or DdpmConfig()
        if self.steps > self.ddpm.diffusion_steps:
            raise UserError(
                f"--steps {self.steps}: --sampler ddpm takes at most the model's {self.ddpm.diffusion_steps} "
                "diffusion steps"
            )

    def _check_sde(self) -> None:
        self._refuse(ODE_FIELDS, "ode")
        self.sde_sampler = _choice("--sde-sampler", self.sde_sampler or "euler", SDE_SAMPLERS)
        self.diffusion_form = _choice("--diffusion-form", self.diffusion_form or "sigma", DIFFUSION_FORMS)
        self.last_step = _choice("--last-step", self.last_step or "mean", LAST_STEPS)
        self.steps = 50 if self.steps is None else self.steps
        self.diffusion_norm = 1.0 if self.diffusion_norm is None else float(self.diffusion_norm)
        if self.diffusion_norm < 0:
            raise UserError(f"--diffusion-norm {self.diffusion_norm}: must be >= 0")
        if self.last_step == "none":
            if self.sde_sampler == "heun":
                raise UserError(
                    "--last-step none with --sde-sampler heun evaluates the score at t = 1, where it is "
                    "infinite (the release returns NaN); choose --last-step mean, tweedie or euler"
                )
            if self.last_step_size not in (None, 0.0):
                raise UserError("--last-step-size applies to --last-step mean, tweedie or euler; drop it")
            self.last_step_size = 0.0
            return
        self.last_step_size = 0.04 if self.last_step_size is None else float(self.last_step_size)
        start = SBDM_START if self.diffusion_form == "sbdm" else 0.0
        if not 0 < self.last_step_size < 1 - start:
            raise UserError(
                f"--last-step-size {self.last_step_size}: must be in (0, {1 - start:g}) "
                "(or --last-step none to run the SDE to t = 1)"
            )


def options_record(options: SamplingOptions) -> dict:
    """The options as plain JSON values for a run's records (`ddpm` left out when unset, so folders
    sampled before it existed resume)."""
    record = asdict(options)
    if record["ddpm"] is None:
        del record["ddpm"]
    return record


def check_objective(objective: str, options: SamplingOptions) -> None:
    """UserError when the sampler is of the other family than the model's objective (model.objective)."""
    ddpm_sampler = options.mode == "ode" and options.sampler == DDPM
    if objective == "ddpm" and not ddpm_sampler:
        used = f"--sampler {options.sampler}" if options.mode == "ode" else "--mode sde"
        fix = "use --sampler ddpm" if options.mode == "ode" else "drop --mode sde and use --sampler ddpm"
        raise UserError(
            f"{used} is a flow sampler, but this model has objective ddpm (it predicts noise at timestep "
            f"indices): {fix}"
        )
    if objective != "ddpm" and ddpm_sampler:
        raise UserError(
            "--sampler ddpm needs a model with objective ddpm; this is a flow model: use an ODE sampler "
            "such as --sampler heun, or --mode sde"
        )


def autocast_dtype(option: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an `autocast` option on `device` (None: full precision)."""
    if option == "bf16" or (option == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
