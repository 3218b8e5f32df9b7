"""The launch section and cluster profiles: where and on what a run is submitted.

Two layers, so that a recipe says what a run needs and a profile says what a cluster is:
- `ClusterProfile` (one YAML file per cluster in `cluster/`): partition, account, GPUs and CPUs
  per node, memory, time limit, setup lines, environment. Written once per cluster.
- `LaunchConfig` (the `launch:` section of a recipe, or `--set launch.*`): which profile, how many
  nodes, and per-run changes to the profile's values. `resolve_resources` merges the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from fitscale.config.bounds import bound
from fitscale.config.errors import ConfigError
from fitscale.config.schema import check_choices


@dataclass
class LaunchConfig:
    """How `fitscale launch` submits this run; `None` fields take the cluster profile's value."""

    cluster: str = "local"
    """Cluster profile: a name in `cluster/` (local, local-slurm, example-cluster) or a path to a YAML file."""
    nodes: int = field(default=1, metadata=bound(1))
    """Nodes of the job; ranks = nodes x tasks per node."""
    gpus_per_node: int | None = field(default=None, metadata=bound(0, meaning="or null for the profile's"))
    """GPUs to request per node (one task each); None takes the profile's."""
    tasks_per_node: int | None = field(default=None, metadata=bound(1, meaning="or null"))
    """Processes per node; None means one per GPU, or the profile's `tasks_per_node` on CPU-only nodes."""
    time_min: int | None = field(default=None, metadata=bound(0, meaning="or null for the profile's"))
    """Time limit of one job in minutes (a requeued job gets a fresh one); None takes the profile's."""
    signal_delay_s: int = field(default=120, metadata=bound(0))
    """SLURM sends SIGUSR2 this many seconds before the time limit, so the run can checkpoint and requeue."""
    max_timeout_requeues: int = field(default=3, metadata=bound(0))
    """Requeues allowed after hitting the time limit; preemptions do not count. 0 ends the run at the limit."""
    job_name: str = ""
    """SLURM job name; empty uses `fitscale-<run folder name>`."""
    sbatch: dict[str, Any] = field(default_factory=dict)
    """Extra or changed sbatch options for this run, e.g. {qos: high, partition: debug}; override the profile."""

    def __post_init__(self) -> None:
        check_choices(self, "launch.")


@dataclass
class ClusterProfile:
    """One cluster: what every job there asks SLURM for, and how its nodes are set up."""

    name: str = "local"
    """Shown in `--dry-run` and in the run folder's launch record."""
    scheduler: Literal["slurm", "local"] = "slurm"
    """`slurm` submits with submitit; `local` runs the processes on this machine (no SLURM)."""
    partition: str | None = None
    """SLURM partition (`--partition`); None uses the cluster's default."""
    account: str | None = None
    """SLURM account to charge (`--account`)."""
    qos: str | None = None
    """SLURM quality of service (`--qos`)."""
    constraint: str | None = None
    """SLURM node features (`--constraint`, e.g. `h100`)."""
    gpus_per_node: int = field(default=0, metadata=bound(0))
    """GPUs per node; one task per GPU. 0 for CPU-only nodes."""
    tasks_per_node: int = field(default=1, metadata=bound(1))
    """Processes per node on CPU-only nodes (ignored when GPUs are requested)."""
    cpus_per_task: int = field(default=1, metadata=bound(1))
    """CPU cores per task (data-loader workers run on them)."""
    mem_gb: float | None = field(default=None, metadata=bound(0, meaning="0 = the whole node"))
    """Memory per node in GB; None leaves SLURM's default, 0 asks for the whole node."""
    time_min: int = field(default=60, metadata=bound(1))
    """Default time limit of one job in minutes."""
    exclusive: bool = False
    """Ask for whole nodes (`--exclusive`)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run in the batch script before the tasks start (module loads, venv activation)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables every task gets (e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA)."""
    sbatch: dict[str, Any] = field(default_factory=dict)
    """Further sbatch options, spelled as submitit's `slurm_*` names without the prefix."""
    srun_args: list[str] = field(default_factory=list)
    """Extra arguments of the `srun` that starts the tasks (e.g. --cpu-bind=none)."""
    max_nodes: int = field(default=0, metadata=bound(0))
    """Largest job this cluster allows, checked by `--dry-run`; 0 means no limit."""

    def __post_init__(self) -> None:
        # `load_profile` names the file before each message
        check_choices(self, "")


@dataclass(frozen=True)
class Resources:
    """What one job of a run gets: the profile with the run's launch section applied."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    cpus_per_task: int
    time_min: int

    @property
    def world_size(self) -> int:
        """Ranks of the job: nodes * tasks_per_node (one task per GPU)."""
        return self.nodes * self.tasks_per_node


def resolve_resources(launch: LaunchConfig, profile: ClusterProfile) -> Resources:
    """Merge the launch section onto the profile, checking what the profile allows."""
    gpus = profile.gpus_per_node if launch.gpus_per_node is None else launch.gpus_per_node
    if launch.tasks_per_node is not None:
        tasks = launch.tasks_per_node
    else:
        tasks = gpus if gpus > 0 else profile.tasks_per_node
    if gpus > 0 and tasks != gpus:
        raise ConfigError(
            f"launch.tasks_per_node={tasks} but {gpus} GPUs per node are requested: fitscale runs one task "
            f"per GPU; leave launch.tasks_per_node unset or set it to {gpus}"
        )
    if profile.max_nodes and launch.nodes > profile.max_nodes:
        raise ConfigError(
            f"launch.nodes={launch.nodes} exceeds the max_nodes={profile.max_nodes} of cluster profile {profile.name!r}"
        )
    if profile.scheduler == "local" and gpus > 0:
        import torch

        available = torch.cuda.device_count()
        if gpus > available:
            raise ConfigError(
                f"launch.gpus_per_node={gpus} but this machine has {available} GPUs; "
                f"set --gpus-per-node {available} or use a SLURM cluster profile"
            )
    time_min = profile.time_min if launch.time_min is None else launch.time_min
    if time_min < 1:
        raise ConfigError(f"launch.time_min: a job needs at least 1 minute, got {time_min}")
    return Resources(
        nodes=launch.nodes,
        tasks_per_node=tasks,
        gpus_per_node=gpus,
        cpus_per_task=profile.cpus_per_task,
        time_min=time_min,
    )
