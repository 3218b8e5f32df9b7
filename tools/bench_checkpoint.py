"""Checkpoint cost of a real model's full training state: sync save, async save, load, export.

One process (world size 1, FSDP2 over one device so the state is DTensors as in a real run):
a FiTv2 preset with AdamW moments filled by one step and an EMA. It measures how long the step
loop is blocked by a synchronous save and by an asynchronous one (staging to host memory), the
background write, the load of the same checkpoint into fresh objects, and the offline export of
the EMA to one bf16 safetensors file.

    python tools/bench_checkpoint.py --model fitv2-xl --dir /tmp/ckpt_bench [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def build_training(model_name: str, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fitscale.checkpoint import ModelState, OptimizerState, PerRankState, RNGState
    from fitscale.config.optim import EMAConfig, OptimConfig
    from fitscale.models import build_model
    from fitscale.parallel.ema import EMA
    from fitscale.train.optim import build_optimizer

    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_model(model_name)
    mesh = init_device_mesh(device.type, (1,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    model.init_weights()
    optimizer = build_optimizer(model, OptimConfig())
    for param in model.parameters():
        param.grad = torch.randn_like(param) * 1e-3
    optimizer.step()
    optimizer.zero_grad()
    ema = EMA(model, EMAConfig())
    state = {
        "model": ModelState(model),
        "optimizer": OptimizerState(model, optimizer),
        "ema": ema,
        "rng": PerRankState(RNGState()),
    }
    return model, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fitv2-xl")
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from fitscale.checkpoint import CheckpointManager
    from fitscale.checkpoint.export import export_checkpoint
    from fitscale.config.checkpoint import CheckpointConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)
    store = tempfile.mkdtemp()
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store}/store", rank=0, world_size=1)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    shutil.rmtree(root, ignore_errors=True)
    model, state = build_training(args.model, device)
    params = sum(p.numel() for p in model.parameters())
    result: dict = {"model": args.model, "parameters": params, "device": str(device)}
    if device.type == "cuda":
        result["device_name"] = torch.cuda.get_device_name()

    sync = CheckpointManager(root / "sync", CheckpointConfig(), handle_signals=False)
    started = time.perf_counter()
    sync.save(1, state)
    result["sync_save_s"] = time.perf_counter() - started
    written = folder_bytes(root / "sync" / "checkpoints" / "step-1")
    result["checkpoint_gib"] = written / 2**30
    result["sync_save_gib_per_s"] = written / 2**30 / result["sync_save_s"]

    background = CheckpointManager(root / "async", CheckpointConfig(async_save=True), handle_signals=False)
    started = time.perf_counter()
    background.save(1, state)
    result["async_blocking_s"] = time.perf_counter() - started
    background.wait()
    result["async_total_s"] = time.perf_counter() - started
    started = time.perf_counter()  # a second save reuses the staging buffers of the first
    background.save(2, state)
    result["async_blocking_again_s"] = time.perf_counter() - started
    background.wait()

    _, fresh = build_training(args.model, device)
    started = time.perf_counter()
    sync.load(1, fresh)
    if device.type == "cuda":
        torch.cuda.synchronize()
    result["load_s"] = time.perf_counter() - started

    out = root / "ema_bf16.safetensors"
    started = time.perf_counter()
    export_checkpoint(root / "sync", out, ema=True, dtype="bf16")
    result["export_ema_bf16_s"] = time.perf_counter() - started
    result["export_gib"] = os.path.getsize(out) / 2**30

    sync.close()
    background.close()
    from fitscale.runtime.env import leave_process_group

    leave_process_group()
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
