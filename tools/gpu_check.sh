#!/usr/bin/env bash
# The GPU check: on one H100/H200, within 8 minutes (GPU_CHECK_BUDGET_S, default 460 s, of which each
# part gets what is left), measure the new training modes, run the GPU test subset (every CUDA
# attention backend against the reference in bf16, torch.compile, a world-size-1 FSDP2 step, a
# checkpoint round trip) and the baseline benchmarks, print one table and write JSON under $OUT (or
# ./gpu_results). Modes measured (tools/bench_train.py):
#   FiTv2-XL 256 mix: padded (the release's step, for the ratios), varlen+compile (baseline),
#     +static+cudagraphs, +fp8, +fp8row, and the attention backends present (flex+compile,
#     flash+compile: a missing one is reported, not fatal);
#   FiTv2-3B 256 mix with AC: bf16, +fp8 (tensorwise), +fp8row;
#   FiTv2-XL 1024 mix: padded, varlen+compile, +static+cudagraphs;
#   REPA: FiTv2-XL 256 mix with and without DINOv2-B alignment (tools/bench_repa.py).
# Parts run in that order, the GPU tests between the 3B and the 1024 runs; a part the budget cannot
# hold is skipped and says so, and a benchmark stopped at its limit keeps the modes it finished.
# Needs only the repository and a Python with torch. Wheels in wheels/ (tools/gpu_wheels.sh: torchao
# for +fp8, liger-kernel) are installed first when present; without them the +fp8 modes report
# "torchao" errors and everything else runs. Carry the folder: run(..., carry=["wheels"]).
# Pure-Python dependencies missing there can be put on EXTRA_PYTHONPATH.
#   DRY_RUN=1 tools/gpu_check.sh   # CPU: the same script on the tiny model, a few steps per mode
set -u
cd "$(dirname "$0")/.."
out_dir=${OUT:-$PWD/gpu_results}
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fitscale-inductor}
py=${PYTHON:-python3}
dry=${DRY_RUN:-0}
start=$(date +%s)
budget=${GPU_CHECK_BUDGET_S:-460}
left() { echo $(( budget - ($(date +%s) - start) )); }

if [ "$dry" = 1 ]; then
  echo "== wheels: a dry run installs nothing; it would install: $(ls wheels/*.whl 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')"
elif [ -d wheels ] && ls wheels/*.whl > /dev/null 2>&1; then
  echo "== wheels"
  for wheel in wheels/*.whl; do  # one by one: a wheel that does not fit this machine costs only itself
    if $py -m pip install -q --no-index --no-deps --find-links wheels/ "$wheel" > "$out_dir/pip.log" 2>&1; then
      echo "  $(basename "$wheel"): installed"
    else
      echo "  $(basename "$wheel"): not installed: $(tail -n 1 "$out_dir/pip.log")"
    fi
  done
else
  echo "== wheels: none in wheels/ (tools/gpu_wheels.sh); float8 modes will report torchao missing"
fi
if [ "$dry" = 1 ]; then
  echo "dry run on $(uname -m): tiny model, CPU"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
$py - <<'PY'
import importlib.util, torch
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print("torch", torch.__version__, "cuda", torch.version.cuda, device)
for name in ("flash_attn", "flash_attn_interface", "deepspeed", "omegaconf", "torchao", "liger_kernel",
             "torch.nn.attention.varlen"):
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    print(f"  {name}: {'yes' if found else 'absent'}")
PY
git rev-parse --short HEAD 2>/dev/null > "$out_dir/commit.txt" || true

bench() {  # name, time limit, then bench_train.py arguments; the limit is cut to the budget left
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -lt 30 ]; then
    echo "$name: skipped, $remaining s of the ${budget} s budget left"
    return
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  if [ "$dry" = 1 ]; then
    set -- "$@" --model tiny --depth 1 --images 4 --steps 1 --warmup 1 --float8-all
  fi
  echo "== $name (limit ${limit} s)"
  timeout "$limit" $py tools/bench_train.py "$@" --json "$out_dir/$name.json" > "$out_dir/$name.log" 2>&1 \
    || echo "$name: exit $? (see $name.log)"
  tail -n 12 "$out_dir/$name.log"
}
if [ "$dry" = 1 ]; then  # CPU: packed CPU backends, no compile; +cudagraphs and flash report their errors
  xl="padded,grouped,grouped+static,grouped+compile+static+cudagraphs,grouped+fp8,grouped+fp8row,flash+compile"
  big="grouped+ac,grouped+ac+fp8,grouped+ac+fp8row"
  hi="padded,grouped,grouped+static"
else
  # XL +fp8row converts no linear (torchao's rowwise filter at D=1152): it should equal varlen+compile.
  xl="padded,varlen+compile,varlen+compile+static+cudagraphs,varlen+compile+fp8,flex+compile,flash+compile"
  xl="$xl,varlen+compile+fp8row"
  big="varlen+compile+ac,varlen+compile+ac+fp8,varlen+compile+ac+fp8row"
  hi="padded,varlen+compile,varlen+compile+static+cudagraphs"
fi
# The new modes first: they are what this check exists to measure.
bench bench_xl_256_modes 180 --model fitv2-xl --mix 256 --modes "$xl" --steps 5
bench bench_3b_256_fp8 110 --model fitv2-3b --mix 256 --modes "$big" --steps 4

tests_limit=$(( $(left) - 50 ))
[ "$tests_limit" -gt 120 ] && tests_limit=120
if [ "$dry" = 1 ]; then
  echo "== GPU tests: not in a dry run"
elif [ "$tests_limit" -lt 30 ]; then
  echo "== GPU tests: skipped, $(left) s of the ${budget} s budget left"
else
  echo "== GPU tests (limit ${tests_limit} s)"
  timeout "$tests_limit" $py -m pytest -q -p no:cacheprovider -o addopts="" tests/unit/test_attention_backends.py \
    tests/gpu 2>&1 | tee "$out_dir/gpu_tests.log" | tail -n 25
fi

bench bench_xl_1024 120 --model fitv2-xl --mix 1024 --modes "$hi" --steps 4

# REPA (recipes/fitv2_xl_256_repa.yaml against fitv2_xl_256.yaml): step time with the DINOv2-B encoder
# and the projector after block 10, eager, on the same 256-token mix; needs timm (extra `repa`).
repa_limit=$(( $(left) )); [ "$repa_limit" -gt 90 ] && repa_limit=90
if [ "$repa_limit" -lt 30 ]; then
  echo "== bench_repa_xl: skipped, $(left) s of the ${budget} s budget left"
else
  repa_args="--model fitv2-xl --block 10 --images 32 --steps 4"
  [ "$dry" = 1 ] && repa_args="--model tiny --block 1 --encoder vit_tiny_patch16_224 --images 4 --steps 1 --warmup 1"
  echo "== bench_repa_xl (limit ${repa_limit} s)"
  timeout "$repa_limit" $py tools/bench_repa.py $repa_args --json "$out_dir/repa_xl.json" > "$out_dir/repa_xl.txt" 2>&1 \
    || echo "bench_repa_xl: exit $? (see repa_xl.txt)"
  tail -n 3 "$out_dir/repa_xl.txt"
fi

echo "== summary ($(( $(date +%s) - start )) s)"
$py - "$out_dir" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for log in sorted(out.glob("bench_*.log")):
    path = log.with_suffix(".json")
    if path.is_file():
        report = json.loads(path.read_text())
        results = report["results"]
    else:  # stopped at its time limit: the modes it finished, from their JSON lines in the log
        report = {"model": log.stem, "mix": "?"}
        results = [json.loads(line) for line in log.read_text().splitlines() if line.startswith('{"mode"')]
    for r in results:
        rows.append((f"{report['model']} mix {report['mix']}", r))
print(f"{'run':24} {'mode':34} {'real tok/s':>11} {'img/s':>8} {'MFU':>6} {'GiB':>6} {'x padded':>8} {'fp8':>4}")
for run, r in rows:
    if "error" in r:
        print(f"{run:24} {r['mode']:34} {r['error'][:60]}")
        continue
    print(f"{run:24} {r['mode']:34} {r['real_tokens_per_s']:11.0f} {r['images_per_s']:8.1f} "
          f"{r.get('mfu', 0):6.1%} {r.get('peak_memory_gib', 0):6.1f} {r.get('speedup_vs_padded', float('nan')):8.2f} "
          f"{r.get('float8_converted', ''):>4}")
(out / "summary.json").write_text(json.dumps([{"run": run, **r} for run, r in rows], indent=2))
PY
