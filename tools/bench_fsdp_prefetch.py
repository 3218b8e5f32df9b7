"""FSDP2 step time with explicit all-gather prefetch of 0, 1, 2 ... blocks (`parallel.fsdp_prefetch`).

Every rank trains the same preset on its own packed steps (the benchmark's image mix), sharded
by fitscale's `apply_fsdp`; each prefetch depth is measured in the same processes, one after the
other, with fresh weights. Prefetch only moves all-gathers earlier, so the losses of every depth
must agree; the step times say whether the cluster's network gains from it.

    torchrun --nproc-per-node 8 tools/bench_fsdp_prefetch.py --model fitv2-xl     # one GPU node
    python tools/bench_fsdp_prefetch.py --spawn 2 --model tiny --hidden 256 --depth 8   # CPU, gloo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import bench_train
import torch
import torch.distributed as dist

from fitscale.config.parallel import ParallelConfig
from fitscale.models import build_model
from fitscale.parallel.fsdp import apply_fsdp
from fitscale.runtime.env import init_distributed_from_env, leave_process_group
from fitscale.runtime.local import launch_local


def measure(args, depth: int, device: torch.device) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    overrides = {k: v for k, v in (("hidden_size", args.hidden), ("depth", args.depth)) if v}
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(args.model, **overrides)
    apply_fsdp(model, mesh, ParallelConfig(fsdp_prefetch=depth), device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
    count = args.warmup + args.steps
    grids = bench_train.imagenet_like_grids(args.images * count, args.mix, seed=dist.get_rank())
    per_step = [grids[i * args.images : (i + 1) * args.images] for i in range(count)]
    budget = -(-max(sum(r * c for r, c in g) for g in per_step) // 128) * 128  # one static token count
    config = model.config
    steps = [
        bench_train.build_step_inputs(
            g, config.token_dim, args.mix, False, budget, device, config.num_classes
        )
        for g in per_step
    ]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for inputs in steps[: args.warmup]:
        bench_train.train_step(model, optimizer, inputs, dtype)
    bench_train.sync(device)
    dist.barrier()
    start = time.perf_counter()
    for inputs in steps[args.warmup :]:
        loss = bench_train.train_step(model, optimizer, inputs, dtype)
    bench_train.sync(device)
    dist.barrier()
    elapsed = (time.perf_counter() - start) / args.steps
    losses = [None] * dist.get_world_size()
    dist.all_gather_object(losses, float(loss))
    return {"fsdp_prefetch": depth, "step_ms": 1000 * elapsed, "last_losses": losses}


def worker(args) -> None:
    info = init_distributed_from_env()
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for _ in range(args.repeats):
        for depth in args.prefetch:
            results.append(measure(args, depth, device))
            if dist.get_rank() == 0:
                print(json.dumps(results[-1]), flush=True)
    if dist.get_rank() == 0:
        report = {
            "model": args.model,
            "hidden": args.hidden,
            "depth": args.depth,
            "world_size": dist.get_world_size(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "results": results,
        }
        print(f"\n{'fsdp_prefetch':>14} {'step ms':>10}")
        for r in results:
            print(f"{r['fsdp_prefetch']:>14} {r['step_ms']:10.1f}")
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    leave_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="fitv2-xl")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--mix", type=int, default=256, choices=[256, 1024])
    parser.add_argument("--images", type=int, default=16, help="images per rank and step")
    parser.add_argument("--prefetch", default="0,1,2", help="comma-separated depths")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per rank")
    parser.add_argument("--spawn", type=int, default=0, help="start this many local ranks (no torchrun)")
    parser.add_argument(
        "--port", type=int, default=None, help="rendezvous port of --spawn (default: a free one)"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        args.prefetch = [int(v) for v in args.prefetch.split(",")]
    except ValueError:
        parser.error(f"--prefetch takes comma-separated integers, got {args.prefetch!r}")
    if any(v < 0 for v in args.prefetch):
        parser.error(f"--prefetch depths must be >= 0, got {args.prefetch}")
    if "RANK" in os.environ:  # a rank of torchrun's or of --spawn's
        worker(args)
    elif args.spawn:
        command = [sys.executable, str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)]
        return launch_local(command, args.spawn, master_port=args.port)
    else:
        parser.error("run under torchrun, or pass --spawn N to start N local ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
