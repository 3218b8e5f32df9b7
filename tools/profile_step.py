"""Where a training step's time goes: the top operators (CPU) or kernels (CUDA) of a few profiled steps.

python tools/profile_step.py --model fitv2-xl --mix 256 --mode varlen+compile          # one GPU
python tools/profile_step.py --model tiny --mix 256 --images 32 --mode grouped         # CPU
"""

from __future__ import annotations

import argparse
import sys

import bench_train
import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="fitv2-xl")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--mix", type=int, default=256, choices=[256, 1024])
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument(
        "--mode", default=None, help="a bench_train mode (default varlen+compile on CUDA, grouped on CPU)"
    )
    parser.add_argument("--order", default="collator", choices=["collator", "arrival"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    mode = args.mode or ("varlen+compile" if cuda else "grouped")
    dtype = torch.bfloat16 if cuda else torch.float32
    images = args.images or (64 if args.mix == 256 else 16)
    grids = bench_train.imagenet_like_grids(images * 8, args.mix, seed=0)
    step_grids = [grids[i * images : (i + 1) * images] for i in range(8)]
    args.warmup, args.peak_tflops = (3 if cuda else 1), None
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def measured(model, optimizer, steps):
        with profile(activities=activities) as prof:
            for inputs in steps[args.warmup : args.warmup + args.steps]:
                bench_train.train_step(model, optimizer, inputs, dtype)
            bench_train.sync(device)
        table = prof.key_averages().table(
            sort_by="cuda_time_total" if cuda else "self_cpu_time_total",
            row_limit=args.top,
            max_name_column_width=70,
        )
        print(table)

    result = bench_train.run_mode(mode, args, step_grids, device, dtype, after_warmup=measured)
    if "error" in result:
        print(f"profile_step: {mode}: {result['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
