"""The model's latent shape follows the dataset it trains on.

A dataset records the latent channels C and patch size p its tokens were cut with (fitscale.json
`latent_channels`, `patch_size`: 4 and 2 for SD-VAE latents, 16 and 2 for a FLUX VAE, 32 and 1
for DC-AE f32c32). Before the model is built, `follow_dataset_shape` sets `model.overrides.in_channels`
and `model.overrides.patch_size` to them where the preset differs, so the recipe names no shape
and the run's config.yaml (which sampling reads) records the one trained. A recipe that sets
either override to another value is refused in one line naming both. The token grid of every
image comes from the dataset's sample table as before.
"""

from __future__ import annotations

from fitscale.config.errors import ConfigError
from fitscale.data.format import LATENT_CHANNELS, PATCH_SIZE

SHAPE_FIELDS = {"in_channels": "latent_channels", "patch_size": "patch_size"}


def follow_dataset_shape(config, meta: dict, where: str) -> list[str]:
    """Set config.model.overrides from the dataset metadata `meta` (read from `where`, for messages);
    returns the fields it set. ConfigError when the recipe's overrides disagree with the dataset."""

    defaults = {"latent_channels": LATENT_CHANNELS, "patch_size": PATCH_SIZE}
    overrides = config.model.overrides
    wanted = {name: int(meta.get(key, defaults[key])) for name, key in SHAPE_FIELDS.items()}
    for name, value in wanted.items():
        set_to = getattr(overrides, name)
        if set_to is not None and set_to != value:
            raise ConfigError(
                f"model.overrides.{name}={set_to} but the dataset {where} holds latents with "
                f"{SHAPE_FIELDS[name]}={value}; remove model.overrides.{name} (the model follows the "
                f"dataset) or train on a dataset written with {SHAPE_FIELDS[name]}={set_to}"
            )
    preset = config.model_config()
    changed = [name for name, value in wanted.items() if getattr(preset, name) != value]
    for name in changed:
        setattr(overrides, name, wanted[name])
    return changed


def follow_training_dataset(config) -> list[str]:
    """`follow_dataset_shape` with the metadata of `data.path` / `data.remote` (fetched if remote).

    A dataset that cannot be read here changes nothing: building the loader then reports it, on
    every rank together, as it always has."""
    from fitscale.data.loader import dataset_meta  # lazy: heavy

    try:
        meta = dataset_meta(config.data)
    except Exception:  # noqa: BLE001 - reported by the loader with its own message
        return []
    where = config.data.remote or config.data.path
    return follow_dataset_shape(config, meta, f"data.path={where}")
