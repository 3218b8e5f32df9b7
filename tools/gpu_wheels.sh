#!/usr/bin/env bash
# Download the wheels the GPU machine lacks (it reaches no package index) into wheels/ (ignored by
# git), for tools/gpu_check.sh to install from there. The GPU machine runs CPython 3.11 on x86-64
# Linux with torch 2.14.1 already installed, so each wheel comes without its dependencies.
#   tools/gpu_wheels.sh            # torchao (float8) and liger-kernel (fused norms), a few MB
#   tools/gpu_wheels.sh -n         # print what it would download
# Wheels over MAX_WHEEL_MB (default 60) are left out and named: the working tree that travels with
# a device call holds at most 64 MiB (e.g. flash-attn 4's ~92 MB CUDA 13 library cannot travel).
# Pass the folder with the call: run(..., carry=["wheels"]).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${WHEELS_DIR:-wheels}
max_mb=${MAX_WHEEL_MB:-60}
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
packages=(${GPU_WHEELS:-torchao==0.18.0 liger-kernel==0.8.5})
target=(--only-binary=:all: --no-deps --python-version 3.11 --implementation cp
        --abi cp311 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
if [ "${1:-}" = "-n" ]; then
  echo "would download into $dest/: ${packages[*]} (CPython 3.11, x86-64 Linux, no dependencies, <= $max_mb MB each)"
  exit 0
fi
mkdir -p "$dest"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
for spec in "${packages[@]}"; do
  if ! "$py" -m pip download -q "${target[@]}" -d "$scratch" "$spec"; then
    echo "$spec: no wheel for CPython 3.11 x86-64 Linux could be downloaded" >&2
    status=1
  fi
done
for wheel in "$scratch"/*.whl; do
  [ -e "$wheel" ] || continue
  size=$(stat -c %s "$wheel")
  name=$(basename "$wheel")
  if [ "$size" -gt $((max_mb * 1024 * 1024)) ]; then
    echo "skipped $name: $((size / 1024 / 1024)) MB is over MAX_WHEEL_MB=$max_mb (cannot travel with a device call)"
    continue
  fi
  mv "$wheel" "$dest/$name"
  echo "$dest/$name ($((size / 1024)) KiB)"
done
echo "total in $dest/: $(du -sh "$dest" | cut -f1)"
exit $status
