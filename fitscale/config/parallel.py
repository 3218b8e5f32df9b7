"""The parallelism section: which backend shards the model, how, and in which precision."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from fitscale.config.bounds import bound
from fitscale.config.errors import ConfigError
from fitscale.config.schema import check_choices

Dtype = Literal["auto", "bf16", "fp32"]


@dataclass
class ParallelConfig:
    """FSDP2 (the default) or DeepSpeed ZeRO driving the same model, loss and data."""

    backend: Literal["fsdp", "deepspeed"] = "fsdp"
    """`fsdp` (torch FSDP2 `fully_shard`) or `deepspeed` (ZeRO stage `zero_stage`)."""
    sharding: Literal["full", "hybrid", "none"] = "full"
    """FSDP: `full` shards over all ranks; `hybrid` (HSDP) shards within groups of `shard_size`
    ranks and replicates across them; `none` replicates everything (data parallel only).
    DeepSpeed (ZeRO-3 only): `hybrid` is ZeRO++'s hpZ, a secondary copy of the weights partitioned
    within groups of `shard_size` ranks, so backward's all-gathers stay inside a node."""
    shard_size: int = field(default=0, metadata=bound(0, meaning="0 = ranks of one node"))
    """Ranks per shard group for `hybrid`; 0 means the ranks of one node (LOCAL_WORLD_SIZE)."""
    reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (less memory, one more all-gather in backward)."""
    fsdp_prefetch: int = field(default=0, metadata=bound(0, meaning="0 = FSDP2's own schedule"))
    """FSDP: blocks whose all-gather each block issues ahead, in forward (the next ones) and in
    backward (the previous ones); 0 keeps FSDP2's own schedule (one block ahead, overlapped on
    a CUDA stream). Each extra block keeps its gathered parameters alive longer; measure with
    tools/bench_fsdp_prefetch.py on the cluster before raising it."""
    activation_checkpointing: Literal["off", "full", "every"] = "off"
    """`off`, `full` (every block recomputes its activations in backward) or `every` (every
    `ac_every`-th block)."""
    ac_every: int = field(default=2, metadata=bound(1))
    """With `activation_checkpointing: every`, checkpoint blocks 0, k, 2k, ..."""
    compile: bool = False
    """`torch.compile` each transformer block (static shapes need `data.token_budget`)."""
    param_dtype: Dtype = "auto"
    """Compute dtype of parameters: `auto` is bf16 on CUDA and fp32 on CPU; master weights stay fp32."""
    reduce_dtype: Dtype = "fp32"
    """Dtype of gradient reduction across ranks."""
    zero_stage: Literal[2, 3] = field(default=3, metadata={"hint": "DeepSpeed stages 2 and 3 are supported"})
    """DeepSpeed ZeRO stage: 2 (optimizer state and gradients sharded) or 3 (parameters too)."""
    float8: Literal["none", "tensorwise", "rowwise"] = "none"
    """FSDP: float8 matmuls in the token linears (torchao `Float8LinearConfig` recipe; needs the
    `float8` extra and a GPU of compute capability 8.9+, emulated on CPU). Weights, checkpoints and
    exports stay in the master dtype. See fitscale/parallel/float8.py for which linears convert."""
    float8_fsdp_all_gather: bool = False
    """With `float8: tensorwise` on several ranks: FSDP2 all-gathers float8 weights (half of bf16's
    bytes), their scales computed once per step after the optimizer step."""
    float8_size_filter: bool = True
    """Skip linears too small to gain from float8 (torchao's H100 thresholds); false converts every
    linear whose dims are multiples of 16 (small test models)."""

    def __post_init__(self) -> None:
        check_choices(self, "parallel.")
        if self.float8_fsdp_all_gather and self.float8 != "tensorwise":
            raise ConfigError(
                f"parallel.float8_fsdp_all_gather=true needs parallel.float8=tensorwise (got {self.float8}); "
                "set parallel.float8=tensorwise or parallel.float8_fsdp_all_gather=false"
            )
