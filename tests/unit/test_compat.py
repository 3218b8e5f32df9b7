"""Every private API of another library that fitscale uses is still there and does what we rely on.

A failure names the API, the installed version and the version fitscale/compat.py was checked
with, so that a library upgrade that removes one fails here, loudly, and not inside a run.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

from fitscale import compat


def need(ok: bool, what: str, distribution: str) -> None:
    if not ok:
        installed = importlib.metadata.version(distribution)
        pytest.fail(
            f"{what} is gone or changed in {distribution} {installed} (fitscale/compat.py was checked with "
            f"{compat.CHECKED_VERSIONS[distribution]}); find its replacement and update fitscale/compat.py",
            pytrace=False,
        )


def has(module: str, name: str) -> bool:
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def source_of(module: str) -> str:
    """A module's source text, found without importing it or its package (DeepSpeed's and
    Streaming's imports take seconds)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)  # a top-level name is located, not imported
    if spec is None or spec.origin is None:
        return ""
    path = Path(spec.origin).parent.joinpath(*rest)
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return path.read_text() if path.is_file() else ""


def test_torch_private_apis():
    import torch

    wrapper = "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"
    need(has(wrapper, "checkpoint_wrapper"), f"{wrapper}.checkpoint_wrapper", "torch")
    model = torch.nn.Sequential(compat.checkpoint_wrapper(torch.nn.Linear(2, 2)))
    need(
        [n for n, _ in model.named_parameters()]
        == ["0._checkpoint_wrapped_module.weight", "0._checkpoint_wrapped_module.bias"],
        "the checkpoint wrapper's `_checkpoint_wrapped_module` name segment",
        "torch",
    )
    for name in ("_foreach_copy_", "_foreach_lerp_"):
        need(hasattr(torch, name), f"torch.{name}", "torch")
    targets, sources = [torch.zeros(3), torch.zeros(2)], [torch.ones(3), torch.full((2,), 4.0)]
    compat.foreach_lerp_(targets, sources, 0.25)
    assert [t.tolist() for t in targets] == [[0.25] * 3, [1.0] * 2]
    compat.foreach_copy_(targets, sources)
    assert [t.tolist() for t in targets] == [[1.0] * 3, [4.0] * 2]
    need(
        has("torch.optim.optimizer", "_get_fused_kernels_supported_devices"),
        "torch's fused-kernel device list",
        "torch",
    )
    need(
        {"cuda", "cpu"} <= compat.fused_optimizer_device_types(), "torch's fused-kernel device list", "torch"
    )
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    compat.set_last_lr(scheduler, [0.5])
    need(scheduler.get_last_lr() == [0.5], "LRScheduler._last_lr behind get_last_lr()", "torch")


def test_torchdata_node_workers_stop():
    import torchdata.nodes as tn

    node = tn.ParallelMapper(tn.IterableWrapper(range(8)), lambda x: x, num_workers=1, method="thread")
    node.reset()
    assert next(node) == 0
    chain, iterator = [], getattr(node, "_it", None)
    while iterator is not None:
        chain.append(iterator)
        iterator = getattr(iterator, "_it", None)
    need(
        any(hasattr(it, "_shutdown") for it in chain),
        "a running node's `_it` with `_shutdown()`",
        "torchdata",
    )
    compat.shutdown_node_workers(node)


def test_streaming_private_apis():
    """Read from Streaming's source: importing it takes seconds."""
    prefix = source_of("streaming.base.shared.prefix")
    for signature in ("def _get_path(prefix_int: int, name: str) -> str:", "def _unpack_locals(data: bytes)"):
        need(signature in prefix, f"streaming.base.shared.prefix {signature}", "mosaicml-streaming")
    dataset = source_of("streaming.base.dataset")
    for name in ("_shard_states", "_shard_access_times"):
        need(f"self.{name} = SharedArray" in dataset, f"StreamingDataset.{name}", "mosaicml-streaming")


def test_submitit_private_apis():
    need(
        importlib.util.find_spec(compat.SUBMITIT_TASK_MODULE) is not None,
        compat.SUBMITIT_TASK_MODULE,
        "submitit",
    )
    need(
        has("submitit.slurm.slurm", "_make_sbatch_string"),
        "submitit.slurm.slurm._make_sbatch_string",
        "submitit",
    )
    need(
        {"nodes", "ntasks_per_node", "setup", "srun_args"} <= compat.sbatch_parameter_names(),
        "sbatch parameters",
        "submitit",
    )
    script = compat.sbatch_string(command="echo hi", folder="/tmp/jobs", nodes=2)
    need("#SBATCH --nodes=2" in script and "echo hi" in script, "_make_sbatch_string's script", "submitit")
    need(
        compat.parse_node_list("gpu[003-005],cpu1") == ["gpu003", "gpu004", "gpu005", "cpu1"],
        "submitit.slurm.slurm._parse_node_list",
        "submitit",
    )


def test_deepspeed_private_attributes_are_where_zero_master_fragments_reads_them():
    """fitscale.parallel.deepspeed_ema.ZeroMasterFragments, parallel/deepspeed.py and
    checkpoint/deepspeed.py read DeepSpeed internals; their source is checked without importing
    DeepSpeed (seconds)."""
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install 'fitscale[deepspeed]')")
    from fitscale.parallel.deepspeed_ema import CHECKED_VERSION

    assert CHECKED_VERSION == compat.CHECKED_VERSIONS["deepspeed"]
    uses = {
        "param._hp_mapping (ZeRO-2 fragment link)": ("deepspeed.runtime.zero.stage_1_and_2", "._hp_mapping"),
        "tensor_fragment.hp_fragment": ("deepspeed.utils.tensor_fragment", "hp_fragment: torch.Tensor"),
        "tensor_fragment.lp_fragment_address": (
            "deepspeed.utils.tensor_fragment",
            "lp_fragment_address: fragment_address",
        ),
        "ZeRO-3 optimizer._reassign_or_swap_out_partitioned_parameters": (
            "deepspeed.runtime.zero.stage3",
            "def _reassign_or_swap_out_partitioned_parameters(self, sub_group_id)",
        ),
        "engine._config.load_universal_checkpoint": (
            "deepspeed.runtime.config",
            "self.load_universal_checkpoint =",
        ),
        "deepspeed.ops.__compatible_ops__": ("deepspeed.ops", '"__compatible_ops__"'),
    }
    for what, (module, text) in uses.items():
        need(text in source_of(module), what, "deepspeed")
