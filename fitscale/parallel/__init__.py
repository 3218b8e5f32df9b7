"""Parallelism applied to a model that knows nothing of it: mesh, AC, compile, FSDP2, DeepSpeed.

The order is fixed (torchtitan's): `apply_ac` -> `apply_compile` -> `apply_fsdp`, on a model
built on the meta device; materialise and initialise afterwards.
"""

from fitscale.parallel.ac import apply_ac
from fitscale.parallel.compile import apply_compile
from fitscale.parallel.fsdp import apply_fsdp, resolve_dtypes
from fitscale.parallel.mesh import DistributedEnv, build_mesh, init_distributed

__all__ = [
    "DistributedEnv",
    "apply_ac",
    "apply_compile",
    "apply_fsdp",
    "build_mesh",
    "init_distributed",
    "resolve_dtypes",
]
