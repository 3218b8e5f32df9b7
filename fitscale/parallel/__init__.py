"""Parallelism applied to a model that knows nothing of it: mesh, AC, compile, FSDP2, DeepSpeed.

`parallelize` applies them in torchtitan's fixed order (float8, `apply_ac`, `apply_compile`,
`apply_fsdp`); a `ParallelBackend` (`build_backend`: FSDP2 or DeepSpeed) is what the Trainer
calls to build, step, clip and checkpoint the model.
"""

from fitscale.lazy import lazy_exports

# Imported on first use, so that importing the package does not import torch.
_EXPORTS = {
    "DistributedEnv": "mesh",
    "ParallelBackend": "backend",
    "apply_ac": "ac",
    "apply_compile": "compile",
    "apply_fsdp": "fsdp",
    "build_backend": "backend",
    "build_mesh": "mesh",
    "init_distributed": "mesh",
    "parallelize": "parallelize",
    "resolve_dtypes": "fsdp",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
