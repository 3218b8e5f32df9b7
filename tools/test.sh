#!/usr/bin/env bash
# The one test entry point, used by README's test command and by .ci/run. In order, stopping at the
# first failure:
#   1. ruff check                     (lint, pyproject.toml [tool.ruff])
#   2. ruff format --check            (formatting)
#      lint-imports                   (the layers contract, pyproject.toml [tool.importlinter]: imports
#                                      only point down, function-level ones included)
#      tools/check_local_imports.py  (function-level imports of fitscale modules only in modules that
#                                      `fitscale --help` loads, or with a `# lazy:` reason)
#   3. pytest -m "not slow and not slurm and not gpu"    the fast lane: no training ranks, minutes
#   4. ATEN_CPU_CAPABILITY=default, then =avx2: pytest -m "numeric and not slow and not slurm and not gpu"
#      the fast tests that compare float results across kernels, again with ATen's non-vectorised
#      CPU kernels and with its AVX2 ones (about 40 s each on 2 cores): a bound that holds only on
#      this machine's kernels fails here (docs/reliability.md, "Numeric tolerances and CPU kernels";
#      on an AVX2-only machine the avx2 rerun repeats step 3's kernels)
#   5. pytest -m "slow or slurm or gpu"                  the rest: multi-process training, the
#      one-host SLURM cluster (started by its tests), CUDA checks (skipped without a GPU)
#
# Both lanes (steps 3 and 5) list their 15 slowest tests (`--durations=15`), so a test that grows shows.
#
#   bash tools/test.sh                      everything
#   bash tools/test.sh --fast               lint, the fast lane and its numeric rerun only
#   bash tools/test.sh -- tests/unit -x     extra pytest arguments after `--`, for every pytest step
#   bash tools/test.sh --lowest-deps        also tools/check_lowest_deps.py after lint (needs the index)
#
# Python: $PYTHON, else .venv/bin/python when it exists, else python3. pytest's "no tests collected"
# (exit 5) in one lane, when arguments narrow the run, is not a failure; in both lanes it is. Step 4
# reruns tests of step 3 (`--fast` runs it too): it collecting none is never a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

fast_only=0
lowest_deps=0
while [ $# -gt 0 ]; do
  case $1 in
    --fast) fast_only=1; shift ;;
    --lowest-deps) lowest_deps=1; shift ;;
    --) shift; break ;;
    *) echo "tools/test.sh: unknown option '$1' (use --fast, --lowest-deps, or -- PYTEST_ARGS)" >&2; exit 2 ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=python3
fi

step() {
  echo "+ $*"
  "$@"
}

step "$py" -m ruff check .
step "$py" -m ruff format --check .
step "$py" -c "from importlinter.cli import lint_imports_command; lint_imports_command()"
step "$py" tools/check_local_imports.py
if [ "$lowest_deps" = 1 ]; then
  # The lowest versions pyproject.toml allows of the light direct dependencies (about 30 s).
  step "$py" tools/check_lowest_deps.py
fi

ran=0
lane() {  # marker expression, then pytest arguments
  local status=0
  step "$py" -m pytest -q -p no:cacheprovider --durations=15 -m "$@" || status=$?
  if [ "$status" = 0 ]; then
    ran=$((ran + 1))
  elif [ "$status" != 5 ]; then
    exit "$status"
  fi
}

lane "not slow and not slurm and not gpu" "$@"
for capability in default avx2; do
  status=0
  step env ATEN_CPU_CAPABILITY=$capability "$py" -m pytest -q -p no:cacheprovider \
    -m "numeric and not slow and not slurm and not gpu" "$@" || status=$?
  if [ "$status" != 0 ] && [ "$status" != 5 ]; then
    exit "$status"
  fi
done
if [ "$fast_only" = 0 ]; then
  lane "slow or slurm or gpu" "$@"
fi
if [ "$ran" = 0 ]; then
  echo "tools/test.sh: no test was collected" >&2
  exit 5
fi
