"""Check fitscale against the lowest versions pyproject.toml allows of its light direct dependencies.

    python tools/check_lowest_deps.py          # about 10-30 s; needs the package index

`pip install --target` puts the floor version (`name>=X` -> `name==X`) of each dependency in
`LIGHT` into a scratch folder that is put first on the path of a child Python, over the installed
environment (torch, numpy and the rest stay as installed), which then loads every recipe, sweep
spec and cluster profile, writes and reads a safetensors file through fitscale's own functions,
draws a tqdm bar, and prints the versions it ran with. Exit status 1 and the failing check when a
floor is too low: raise it in pyproject.toml. The heavy dependencies (torch, numpy, Streaming,
torchdata, scikit-learn, pillow) are left to their own floors' CI, not checked here.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIGHT = ("omegaconf", "pyyaml", "tqdm", "safetensors")

CHECK = r"""
import glob, sys, tempfile
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm import tqdm

from fitscale.checkpoint.export import save_safetensors
from fitscale.config import load_config
from fitscale.launch.profiles import load_profile
from fitscale.models.official import read_checkpoint_file
from fitscale.sweep.spec import load_spec

from packaging.version import Version

floors = dict(arg.split("==") for arg in sys.argv[1:])
ran = {name: version(name) for name in floors}
assert all(Version(ran[k]) == Version(v) for k, v in floors.items()), f"not on the floors: {ran} != {floors}"
recipes = sorted(glob.glob("recipes/*.yaml"))
for recipe in recipes:
    load_config(recipe)
specs = sorted(glob.glob("recipes/scaling/*.yaml"))
for spec in specs:
    load_spec(spec)
profiles = sorted(Path("cluster").glob("*.yaml"))
for profile in profiles:
    load_profile(str(profile))
with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / "w.safetensors"
    save_safetensors({"w": torch.arange(6.0).view(2, 3)}, path, {"preset": "tiny"}, overwrite=False)
    assert torch.equal(read_checkpoint_file(path)["w"], torch.arange(6.0).view(2, 3))
for _ in tqdm(range(3), total=3, initial=0, unit="step", dynamic_ncols=True, file=sys.stderr):
    pass
print(f"ok: {len(recipes)} recipes, {len(specs)} sweep specs, {len(profiles)} cluster profiles, safetensors, "
      f"tqdm with " + ", ".join(f"{k}=={v}" for k, v in ran.items()))
"""


def floors(names: tuple[str, ...] = LIGHT) -> dict[str, str]:
    """{name: lowest allowed version} from `[project].dependencies` (`name>=version` entries)."""
    text = (REPO / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    found = {m[1].lower(): m[2] for m in re.finditer(r'"([A-Za-z0-9_.-]+)>=([0-9][^",;]*)"', block)}
    missing = [name for name in names if name not in found]
    if missing:
        raise SystemExit(f"pyproject.toml declares no `>=` floor for {missing}")
    return {name: found[name] for name in names}


def main() -> int:
    pins = [f"{name}=={version}" for name, version in floors().items()]
    with tempfile.TemporaryDirectory() as target:
        install = [sys.executable, "-m", "pip", "install", "-q", "--target", target, *pins]
        subprocess.run(install, check=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([target, str(REPO)])}
        result = subprocess.run([sys.executable, "-c", CHECK, *pins], cwd=REPO, env=env)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
