"""The run folder: one place per run for everything it writes, whoever writes it.

```
<train.run_dir>/
  config.yaml            the resolved config of the latest start (trainer)
  metrics.jsonl          one line per step, appended across restarts (trainer)
  checkpoints/step-N/    complete checkpoints only; `.step-N.tmp/` while being written (checkpoint manager)
  samples/step-N.png     sample grids of `train.sample_every` (trainer, fitscale.train.previews)
  .lock                  held by the live run (trainer); a second run on the folder is refused
  launch.jsonl           one record per `fitscale launch`: job id, cluster, resources, command (launcher)
  slurm/                 submitit: <job>_submitted.pkl, <job>_<task>_log.out/.err, <job>_<task>_result.pkl
```
A requeued job appends to the same logs and metrics and resumes from `checkpoints/`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

LAUNCH_RECORDS = "launch.jsonl"
SLURM_FOLDER = "slurm"


def slurm_folder(run_dir: str | Path) -> Path:
    """Where SLURM logs and submitit's files of a run go: `<run_dir>/slurm`."""
    return Path(run_dir) / SLURM_FOLDER


def append_launch_record(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Add one submission to `launch.jsonl` (appended, never rewritten)."""
    path = Path(run_dir) / LAUNCH_RECORDS
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}
    with open(path, "a") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")


def launch_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The launch records of a run folder, oldest first; a line cut short by a crash is skipped."""
    path = Path(run_dir) / LAUNCH_RECORDS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash; the others still count
    return records
