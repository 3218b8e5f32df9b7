"""Where a training step's GPU time goes: the top CUDA kernels of a few profiled steps.

python tools/profile_step.py --model fitv2-xl --mix 256 --mode varlen+compile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="fitv2-xl")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--mix", type=int, default=256, choices=[256, 1024])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--mode", default="varlen+compile")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    images = args.images or (64 if args.mix == 256 else 16)
    grids = bench_train.imagenet_like_grids(images * 8, args.mix, seed=0)
    step_grids = [grids[i * images : (i + 1) * images] for i in range(8)]
    args.warmup, args.peak_tflops, args.order, bench_args = 3, None, "collator", args
    from torch.profiler import ProfilerActivity, profile

    def measured(model, optimizer, steps):
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for inputs in steps[: args.steps]:
                bench_train.train_step(model, optimizer, inputs, torch.bfloat16)
            torch.cuda.synchronize()
        table = prof.key_averages().table(
            sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=70
        )
        print(table)

    bench_train.run_mode(args.mode, bench_args, step_grids, device, torch.bfloat16, after_warmup=measured)
    return 0


if __name__ == "__main__":
    sys.exit(main())
