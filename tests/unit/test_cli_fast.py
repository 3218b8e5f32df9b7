"""`fitscale --help` builds every command's parser without importing torch (or numpy)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from check_local_imports import modules_loaded_by_help

ROOT = Path(__file__).resolve().parents[2]

HEAVY = ("torch", "numpy", "streaming", "sklearn", "PIL")


def test_help_imports_no_torch():
    assert sorted(set(HEAVY) & modules_loaded_by_help(ROOT)) == []


def test_lazy_package_exports_resolve():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    probe = (
        "import sys, fitscale.models, fitscale.data, fitscale.checkpoint, fitscale.flow, "
        "fitscale.parallel, fitscale.sweep\n"
        "assert 'torch' not in sys.modules\n"
        "from fitscale.models import build_config, ModelConfig\n"
        "from fitscale.config.model import build_config as direct\n"
        "assert build_config is direct and 'build_model' in dir(fitscale.models)\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    fitscale.models.no_such_name\nexcept AttributeError as e:\n    print(e)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "module 'fitscale.models' has no attribute 'no_such_name'"


def _default_sigint() -> None:
    """In the child before exec: SIGINT's default action and unblocked, as a shell starts a command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_during_start_up_is_one_line_and_status_130(tmp_path):
    """A real SIGINT while `fitscale train` runs its `hooks.before` (before the trainer's own handler
    listens: start-up, importing torch, writing the dataset). Was a 20-line KeyboardInterrupt
    traceback through the import machinery."""
    (tmp_path / "ctrl_c_hook.py").write_text(
        "import os, signal\n\ndef press(config):\n    os.kill(os.getpid(), signal.SIGINT)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    env.pop("FITSCALE_DEBUG", None)
    sets = [f"train.run_dir={tmp_path / 'run'}", "hooks.before=[ctrl_c_hook:press]", "hooks.after=[]"]
    result = subprocess.run(
        [sys.executable, "-m", "fitscale.cli", "train", "recipes/demo.yaml", "--set", *sets],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        # a user's shell starts it with SIGINT's default action; an ignored SIGINT inherited from the
        # test process (an earlier test's worker pool may leave it so) would make Python keep ignoring it
        preexec_fn=_default_sigint,
    )  # fmt: skip
    assert result.stderr.splitlines() == ["fitscale train: interrupted (Ctrl-C); stopped"], result.stderr
    assert result.returncode == 130
