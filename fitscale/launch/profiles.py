"""Cluster profiles: one YAML file per cluster, found by name or path.

`--cluster NAME` looks for `NAME.yaml` in $FITSCALE_CLUSTER_DIR (if set), then `./cluster/`,
then the `cluster/` folder of this checkout; `--cluster path/to/file.yaml` reads that file.
Unknown keys and wrongly typed values are errors that name the file and the key (fitscale.config.schema).
"""

from __future__ import annotations

import os
from pathlib import Path

from fitscale.config.launch import ClusterProfile
from fitscale.config.schema import load_structured

PROFILE_SUFFIXES = (".yaml", ".yml")


def profile_dirs() -> list[Path]:
    """Where profile names are looked up, in order."""
    dirs = []
    if os.environ.get("FITSCALE_CLUSTER_DIR"):
        dirs.append(Path(os.environ["FITSCALE_CLUSTER_DIR"]))
    dirs.append(Path.cwd() / "cluster")
    dirs.append(Path(__file__).resolve().parents[2] / "cluster")
    unique: list[Path] = []
    for folder in dirs:
        if folder not in unique:
            unique.append(folder)
    return unique


def find_profile(name_or_path: str) -> Path:
    """The profile file for `--cluster`: an existing path, or `<name>.yaml` in `profile_dirs()`."""
    candidate = Path(name_or_path)
    if candidate.suffix in PROFILE_SUFFIXES or os.sep in name_or_path:
        if not candidate.is_file():
            raise FileNotFoundError(f"cluster profile {name_or_path!r} does not exist")
        return candidate
    for folder in profile_dirs():
        for suffix in PROFILE_SUFFIXES:
            path = folder / f"{name_or_path}{suffix}"
            if path.is_file():
                return path
    known = sorted({p.stem for folder in profile_dirs() if folder.is_dir() for p in folder.glob("*.y*ml")})
    raise FileNotFoundError(
        f"no cluster profile named {name_or_path!r}; known profiles: {', '.join(known) or 'none'} "
        f"(searched {', '.join(str(d) for d in profile_dirs())}); pass a name or a path to a YAML file"
    )


def load_profile(name_or_path: str) -> ClusterProfile:
    """Read and check a cluster profile; its `name` defaults to the file's stem.

    FileNotFoundError names an unknown profile; every other problem is a one-line ConfigError,
    `cluster profile '<file>': <field>: <problem>` (fitscale.config.schema)."""
    path = find_profile(name_or_path)
    return load_structured(
        ClusterProfile,
        values={"name": path.stem},
        files=[("cluster profile", path)],
        source=f"cluster profile {str(path)!r}",
    )
