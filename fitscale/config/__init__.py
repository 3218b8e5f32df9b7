"""The run configuration: one typed tree of sections, loaded from a YAML recipe plus overrides.

`load_config("recipes/demo.yaml", ["train.steps=50"])` (fitscale/config/run.py) reads the recipe and
the `--set` items with the one loader of config files (fitscale/config/schema.py), builds the
section dataclasses (each checks its own fields), then runs `RunConfig.validate`, the one place for
rules that span sections. Every error is one line that names the field and says what to set instead.

Exports are imported on first use, so that fitscale.models can use the schema helpers while the
run config embeds its ModelConfig.
"""

from fitscale.lazy import lazy_exports

_EXPORTS = {
    "ConfigError": "errors",
    "FlowConfig": "train",
    "HooksSection": "run",
    "ModelOverrides": "model",
    "ModelSection": "model",
    "ParallelConfig": "parallel",
    "RunConfig": "run",
    "SECTIONS": "run",
    "TrainConfig": "train",
    "load_config": "run",
    "split_override": "schema",
    "to_dict": "run",
    "to_yaml": "run",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
