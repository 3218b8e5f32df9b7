"""Parallelism applied to a model that knows nothing of it: mesh, AC, compile, FSDP2, DeepSpeed.

The order is fixed (torchtitan's): `apply_ac` -> `apply_compile` -> `apply_fsdp`, on a model
built on the meta device; materialise and initialise afterwards.
"""

from fitscale.lazy import lazy_exports

# Imported on first use, so that importing the package does not import torch.
_EXPORTS = {
    "DistributedEnv": "mesh",
    "apply_ac": "ac",
    "apply_compile": "compile",
    "apply_fsdp": "fsdp",
    "build_mesh": "mesh",
    "init_distributed": "mesh",
    "resolve_dtypes": "fsdp",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
