"""The `train.ddpm` section: the Gaussian diffusion of a `model.objective=ddpm` model (FiT v1).

The fields are named after the release's `create_diffusion`
(fit/scheduler/improved_diffusion/__init__.py) and mean what they mean there; `learn_sigma` is
not here because it shapes the network and so lives in the model (`model.learn_sigma`). The
section is read only when the model's objective is `ddpm` (fitscale.flow.ddpm builds the
diffusion from it); a flow model ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from fitscale.config.bounds import bound
from fitscale.config.errors import ConfigError
from fitscale.config.schema import check_choices

if TYPE_CHECKING:
    from fitscale.config.train import TrainConfig


@dataclass
class DdpmConfig:
    """The release's `improved_diffusion` section (configs/fit/config_fit_xl.yaml) less
    `timestep_respacing` (sampling picks it: `fitscale sample --sampler ddpm --steps N`)."""

    noise_schedule: Literal["linear", "squaredcos_cap_v2"] = "linear"
    """Beta schedule: `linear` (Ho et al., scaled by 1000 / diffusion_steps) or `squaredcos_cap_v2`
    (the cosine schedule of Nichol and Dhariwal, betas capped at 0.999)."""
    diffusion_steps: int = field(default=1000, metadata=bound(2))
    """Number T of diffusion steps; the model reads the timestep index in [0, T), 0 = data."""
    sigma_small: bool = False
    """Without model.learn_sigma: the posterior variance (FIXED_SMALL) instead of beta (FIXED_LARGE)."""
    predict_xstart: bool = False
    """The model predicts x_0 (START_X) instead of the noise (EPSILON)."""
    use_kl: bool = False
    """Train on the variational bound alone (RESCALED_KL: the KL term times diffusion_steps)."""
    rescale_learned_sigmas: bool = False
    """RESCALED_MSE: the variance's VB term times diffusion_steps / 1000 (ignored with use_kl)."""

    def __post_init__(self) -> None:
        check_choices(self, "train.ddpm.")


def check_objective(objective: str, train: TrainConfig) -> None:
    """ConfigError for train settings the model's objective does not define (the release's use_sit
    switch): for ddpm the flow's timestep law, time shift, REPA and a flow preview sampler; for a
    flow model the ddpm preview sampler. One line naming the field and what to set."""
    sampler, previews = train.sample_sampler, train.sample_every > 0
    if objective != "ddpm":
        if sampler == "ddpm" and previews:
            raise ConfigError(
                "train.sample_sampler=ddpm needs model.objective=ddpm (this is a flow model); choose an ODE "
                "sampler such as heun"
            )
        return
    flow = train.flow
    if flow.timesteps != "uniform":
        raise ConfigError(
            f"train.flow.timesteps={flow.timesteps} with model.objective=ddpm: the release draws the timestep "
            f"index uniformly in [0, train.ddpm.diffusion_steps); set train.flow.timesteps=uniform"
        )
    if flow.time_shift != 1.0:
        raise ConfigError(
            f"train.flow.time_shift={flow.time_shift} with model.objective=ddpm: the release does not shift "
            "DDPM timesteps; set train.flow.time_shift=1"
        )
    if train.repa.enabled:
        raise ConfigError(
            f"train.repa.encoder={train.repa.encoder} with model.objective=ddpm: REPA is defined for flow "
            "models only; set train.repa.encoder=null"
        )
    if previews and sampler != "ddpm":
        raise ConfigError(
            f"train.sample_sampler={sampler} is a flow sampler but model.objective=ddpm: set "
            "train.sample_sampler=ddpm (or train.sample_every=0)"
        )
    if previews and not 2 <= train.sample_steps <= train.ddpm.diffusion_steps:
        raise ConfigError(
            f"train.sample_steps={train.sample_steps}: the ddpm sampler takes 2 to "
            f"train.ddpm.diffusion_steps={train.ddpm.diffusion_steps} steps"
        )
