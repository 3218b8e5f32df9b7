#!/usr/bin/env bash
# The GPU check: on one H100/H200, within 8 minutes, run the GPU test subset (every CUDA attention
# backend against the reference in bf16, torch.compile, a world-size-1 FSDP2 step, a checkpoint round
# trip) and the training benchmarks (FiTv2-XL full depth at the 256- and 1024-token mixes, FiTv2-3B
# with activation checkpointing), print one table and write JSON under $OUT (or ./gpu_results).
# Needs only the repository and a Python with torch; optional packages (flash-attn, deepspeed) are
# used when present. Pure-Python dependencies missing there can be put on EXTRA_PYTHONPATH.
set -u
cd "$(dirname "$0")/.."
out_dir=${OUT:-$PWD/gpu_results}
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/fitscale-inductor}
py=${PYTHON:-python3}
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py - <<'PY'
import importlib.util, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
for name in ("flash_attn", "deepspeed", "omegaconf", "torch.nn.attention.varlen"):
    try:
        found = importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        found = False
    print(f"  {name}: {'yes' if found else 'absent'}")
PY
git rev-parse --short HEAD 2>/dev/null > "$out_dir/commit.txt" || true

echo "== GPU tests"
timeout 240 $py -m pytest -q -p no:cacheprovider -o addopts="" tests/unit/test_attention_backends.py tests/gpu \
  2>&1 | tee "$out_dir/gpu_tests.log" | tail -n 25

echo "== benchmarks"
bench() {  # name, time limit, then bench_train.py arguments
  local name=$1 limit=$2; shift 2
  timeout "$limit" $py tools/bench_train.py "$@" --json "$out_dir/$name.json" > "$out_dir/$name.log" 2>&1 \
    || echo "$name: exit $? (see $name.log)"
  tail -n 12 "$out_dir/$name.log"
}
bench bench_xl_256 210 --model fitv2-xl --mix 256 --modes padded,padded+compile,varlen+compile,varlen+compile+static+cudagraphs,flash+compile --steps 8
bench bench_xl_256_b128 80 --model fitv2-xl --mix 256 --images 128 --modes varlen+compile --steps 6
bench bench_xl_1024 150 --model fitv2-xl --mix 1024 --modes padded,padded+compile,varlen+compile --steps 6
bench bench_3b_256 110 --model fitv2-3b --mix 256 --modes varlen+compile+ac --steps 6

echo "== summary ($(( $(date +%s) - start )) s)"
$py - "$out_dir" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for path in sorted(out.glob("bench_*.json")):
    report = json.loads(path.read_text())
    for r in report["results"]:
        rows.append((f"{report['model']} mix {report['mix']}", r))
print(f"{'run':22} {'mode':22} {'real tok/s':>11} {'img/s':>8} {'MFU':>6} {'GiB':>6} {'x padded':>8}")
for run, r in rows:
    if "error" in r:
        print(f"{run:22} {r['mode']:22} {r['error'][:60]}")
        continue
    print(f"{run:22} {r['mode']:22} {r['real_tokens_per_s']:11.0f} {r['images_per_s']:8.1f} "
          f"{r.get('mfu', 0):6.1%} {r.get('peak_memory_gib', 0):6.1f} {r.get('speedup_vs_padded', float('nan')):8.2f}")
(out / "summary.json").write_text(json.dumps([{"run": run, **r} for run, r in rows], indent=2))
PY
