"""tools/test.sh, the one test entry point of README and CI: its stages, in order, failing fast.

The script is run with `PYTHON` pointing at a stand-in that records each call (with the
ATEN_CPU_CAPABILITY it ran under) and answers with the exit status the test chooses, so the order and
the fail-fast rules are checked without linting or testing anything for real.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAST = "not slow and not slurm and not gpu"
REST = "slow or slurm or gpu"
NUMERIC = f"ATEN_CPU_CAPABILITY=default -m pytest -q -p no:cacheprovider -m numeric and {FAST}"
NUMERIC_AVX2 = NUMERIC.replace("=default", "=avx2")
LINT_IMPORTS = "-c from importlinter.cli import lint_imports_command; lint_imports_command()"
LOCAL_IMPORTS = "tools/check_local_imports.py"


def run_script(tmp_path: Path, *args: str, fail: dict[str, int] | None = None) -> tuple[int, list[str], str]:
    """Run tools/test.sh with a recording stand-in for Python; `fail` maps a call's text to its exit status."""
    log = tmp_path / "calls.txt"
    log.unlink(missing_ok=True)
    rules = "".join(f'  *"{needle}"*) exit {code} ;;\n' for needle, code in (fail or {}).items())
    fake = tmp_path / "python"
    record = '"${ATEN_CPU_CAPABILITY:+ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY }$*"'
    fake.write_text(f'#!/usr/bin/env bash\necho {record} >> {log}\ncase "$*" in\n{rules}esac\nexit 0\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {key: value for key, value in os.environ.items() if key != "ATEN_CPU_CAPABILITY"}
    env["PYTHON"] = str(fake)
    result = subprocess.run(
        ["bash", str(REPO / "tools" / "test.sh"), *args], env=env, capture_output=True, text=True, timeout=60
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result.returncode, calls, result.stderr


def test_lint_then_the_fast_lane_then_its_numeric_tests_on_default_and_avx2_kernels_then_the_rest(tmp_path):
    code, calls, _ = run_script(tmp_path, "--", "tests/unit")
    assert code == 0
    assert calls == [
        "-m ruff check .",
        "-m ruff format --check .",
        LINT_IMPORTS,
        LOCAL_IMPORTS,
        f"-m pytest -q -p no:cacheprovider --durations=15 -m {FAST} tests/unit",
        f"{NUMERIC} tests/unit",
        f"{NUMERIC_AVX2} tests/unit",
        f"-m pytest -q -p no:cacheprovider --durations=15 -m {REST} tests/unit",
    ]


def test_the_first_failure_stops_the_run_with_its_status(tmp_path):
    code, calls, _ = run_script(tmp_path, fail={"ruff format": 1})
    assert code == 1
    assert calls == ["-m ruff check .", "-m ruff format --check ."]
    code, calls, _ = run_script(tmp_path, fail={"lint_imports_command": 1})  # an import that points up
    assert (code, calls[-1]) == (1, LINT_IMPORTS) and not any("pytest" in call for call in calls)
    code, calls, _ = run_script(tmp_path, fail={LOCAL_IMPORTS: 1})  # a function-level import without reason
    assert (code, calls[-1]) == (1, LOCAL_IMPORTS) and not any("pytest" in call for call in calls)
    code, calls, _ = run_script(tmp_path, fail={FAST: 1})
    assert code == 1
    assert not any(REST in call for call in calls)
    code, calls, _ = run_script(tmp_path, fail={"-m numeric": 1})  # a bound that holds on AVX only
    assert code == 1
    assert calls[-1] == NUMERIC and not any(REST in call for call in calls)


def test_a_lane_with_no_tests_passes_but_no_tests_at_all_fails(tmp_path):
    assert run_script(tmp_path, fail={REST: 5})[0] == 0
    code, _, err = run_script(tmp_path, fail={"pytest": 5})
    assert (code, err.strip()) == (5, "tools/test.sh: no test was collected")
    assert run_script(tmp_path, "--fast", fail={FAST: 5})[0] == 5


def test_fast_and_lowest_deps_options(tmp_path):
    code, calls, _ = run_script(tmp_path, "--fast", "--lowest-deps")
    assert code == 0
    assert calls[4] == "tools/check_lowest_deps.py"
    assert [call for call in calls if "pytest" in call] == [
        f"-m pytest -q -p no:cacheprovider --durations=15 -m {FAST}",
        NUMERIC,
        NUMERIC_AVX2,
    ]
    code, _, err = run_script(tmp_path, "--full")
    assert code == 2
    assert (
        err.strip() == "tools/test.sh: unknown option '--full' (use --fast, --lowest-deps, or -- PYTEST_ARGS)"
    )


def test_readme_and_ci_install_the_same_way_and_run_the_script():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^    (python3 -m venv \.venv && .*)$", readme, flags=re.M)
    tests = [c for c in commands if "[dev]" in c]
    assert len(tests) == 1, commands
    install = tests[0].split(" && ")
    assert install[0] == "python3 -m venv .venv"
    assert install[-1] == "bash tools/test.sh"
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert install[0] in ci and install[1] in ci, "README's test command and .ci/run install differently"
    assert ci[-1] == "bash tools/test.sh --lowest-deps"
