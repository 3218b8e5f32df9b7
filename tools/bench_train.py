"""Training-step throughput of FiTv2: packed attention backends against the released padded method.

One full step (forward, backward, AdamW) on the same images in every mode:
- packed modes: images back to back with no padding (plus a static tail, in short padding segments
  as the collator makes them, so compiled graphs are reused), attention through a varlen backend
  (flash, varlen, flex, grouped, reference);
- `padded`: the release's method: every image padded to the token limit (256 or 1024) and
  attention masked densely, the baseline every ratio is taken against.
Each mode may add `+compile` (torch.compile per block; `+autotune` with compile: its
max-autotune-no-cudagraphs mode), `+ac` (activation checkpointing),
`+bf16w` (bf16 weights and optimizer state, no fp32 master copy: the mixed-precision ceiling),
`+static` (packed steps with one segment count and one `max_seqlen`, zero-length segments
appended: every step has the same shapes and scalars), `+cudagraphs` (with compile and
static: CUDA graphs replay each block, removing the kernel-launch cost from the host) and
`+fp8` / `+fp8row` (torchao float8 tensorwise / rowwise matmuls in the linears that pass
torchao's size filter, fitscale.parallel.float8; emulated on CPU; `--float8-all` converts every
linear with dims multiples of 16, for small CPU models). MFU stays counted in bf16 FLOPs.
MFU counts real FLOPs only (fitscale.models.flops on the real image lengths): padding does not count.

Image sizes follow the paper's preprocessing applied to ImageNet-like originals: aspect ratios
4:3, 3:4, 1:1, 3:2, 16:9, 2:3 and short sides around 375 px, downscaled to at most S x S pixels of
area (S = 256 or 512), sides floored to multiples of 16 px, 8x VAE, patch 2.

    python tools/bench_train.py --model fitv2-xl --mix 256 --json out.json           # one GPU
    python tools/bench_train.py --model tiny --mix 256 --images 16 --steps 3          # CPU smoke
    python tools/bench_train.py --model tiny --hidden 256 --depth 4 --mix 1024 --images 16  # wider CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

from fitscale.data.batch import cu_seqlens_from_lengths, grid_positions, padding_lengths
from fitscale.hardware import lookup_peak_flops
from fitscale.models import build_model
from fitscale.models.attention import (
    flash_attn_available,
    segment_ids_from_cu_seqlens,
    torch_varlen_available,
)
from fitscale.models.flops import training_flops
from fitscale.models.inputs import check_packed_batch

ASPECTS = [((4, 3), 0.45), ((3, 4), 0.12), ((1, 1), 0.13), ((3, 2), 0.15), ((16, 9), 0.08), ((2, 3), 0.07)]


def imagenet_like_grids(count: int, max_tokens: int, seed: int) -> list[tuple[int, int]]:
    """(rows, cols) patch grids of `count` images after the paper's resize preprocessing."""
    generator = torch.Generator().manual_seed(seed)
    side = 16 * math.isqrt(max_tokens)  # pixels: 256 for 256 tokens, 512 for 1024
    weights = torch.tensor([w for _, w in ASPECTS])
    grids = []
    while len(grids) < count:
        (a, b) = ASPECTS[int(torch.multinomial(weights, 1, generator=generator))][0]
        short = float(torch.empty(1).log_normal_(math.log(375), 0.35, generator=generator).clamp(96, 2000))
        height, width = (short * a / b, short) if a > b else (short, short * b / a)
        if height * width > side * side:
            scale = math.sqrt(side * side / (height * width))
            height, width = height * scale, width * scale
        rows, cols = int(height // 16), int(width // 16)  # 16 px = 8x VAE x patch 2
        if rows * cols >= 16:
            grids.append((rows, cols))
    return grids


def build_step_inputs(
    grids,
    token_dim: int,
    max_tokens: int,
    padded: bool,
    budget: int,
    device,
    num_classes: int,
    sort_by_length: bool = True,
):
    """Packed (real images back to back, padding segments up to `budget`) or padded-to-limit inputs.

    Packed images are ordered as fitscale's collator orders them, longest first, unless
    `sort_by_length` is off (arrival order: the `grouped` backend then gathers by length).
    """
    lengths = [r * c for r, c in grids]
    count = len(grids)
    if padded:
        seg = [max_tokens] * count
        pos = torch.cat(
            [
                torch.cat([grid_positions(r, c), torch.zeros(max_tokens - r * c, 2, dtype=torch.int64)])
                for r, c in grids
            ]
        )
        sizes = torch.tensor(grids)
        real_mask = torch.cat([torch.arange(max_tokens) < n for n in lengths])
        labels = torch.randint(0, num_classes, (count,))
    else:
        if sort_by_length:  # the collator's order: longest first, equal lengths adjacent
            grids = sorted(grids, key=lambda grid: -grid[0] * grid[1])
            lengths = [r * c for r, c in grids]
        tail = padding_lengths(budget - sum(lengths))  # as the collator splits its padding
        seg = lengths + tail
        pos = torch.cat([grid_positions(r, c) for r, c in grids] + [grid_positions(1, n) for n in tail])
        sizes = torch.tensor(grids + [(1, n) for n in tail])
        real_mask = torch.arange(sum(seg)) < sum(lengths)
        labels = torch.cat(
            [torch.randint(0, num_classes, (count,)), torch.full((len(seg) - count,), num_classes)]
        )
    cu = cu_seqlens_from_lengths(seg)
    total = int(cu[-1])
    return {
        "x1": torch.randn(total, token_dim, device=device) * real_mask[:, None].to(device),
        "labels": labels.to(device),
        "pos": pos.to(device),
        "cu_seqlens": cu.to(device),
        "max_seqlen": max(seg),
        "sizes": sizes.to(device),
        "segment_ids": segment_ids_from_cu_seqlens(cu, total).to(device),
        "real_mask": real_mask.to(device),
        "num_images": count,
        "num_segments": len(seg),
    }


def with_static_segments(inputs: dict, num_segments: int, max_seqlen: int, null_class: int) -> dict:
    """The same packed step with `num_segments` segments (zero-length ones appended, null class,
    1x1 grid) and a fixed `max_seqlen` (at least the longest image): identical shapes and scalars
    in every step, as CUDA graphs need; the output for every token is unchanged."""
    from fitscale.parallel.cuda_graphs import StaticShapes, static_model_inputs

    if num_segments < inputs["num_segments"] or max_seqlen < inputs["max_seqlen"]:
        raise ValueError(
            f"a step has {inputs['num_segments']} segments and a longest one of {inputs['max_seqlen']}"
        )
    x, labels, pos, cu = inputs["x1"], inputs["labels"], inputs["pos"], inputs["cu_seqlens"]
    t = x.new_ones(inputs["num_segments"])  # drawn again in every step
    (_, _, labels, _, cu), static = static_model_inputs(
        StaticShapes(num_segments, max_seqlen),
        null_class,
        x,
        t,
        labels,
        pos,
        cu,
        inputs["max_seqlen"],
        inputs["sizes"],
    )
    return {**inputs, "cu_seqlens": cu, "labels": labels, **static, "num_segments": num_segments}


def train_step(model, optimizer, inputs, dtype, cudagraphs: bool = False) -> torch.Tensor:
    if cudagraphs:  # a new step: the graphs' outputs of the previous one may be overwritten
        torch.compiler.cudagraph_mark_step_begin()
    x1 = inputs["x1"]
    t = torch.rand(inputs["num_segments"], device=x1.device)
    x0 = torch.randn_like(x1)
    t_tok = t[inputs["segment_ids"]][:, None]
    weight_dtype = model.x_embedder.proj.weight.dtype  # bf16 in the "+bf16w" modes (no master weights)
    with torch.autocast(x1.device.type, dtype=dtype, enabled=dtype != torch.float32):
        v = model(
            (t_tok * x1 + (1 - t_tok) * x0).to(weight_dtype),
            t,
            inputs["labels"],
            inputs["pos"],
            inputs["cu_seqlens"],
            inputs["max_seqlen"],
            inputs["sizes"],
        )
    err = (v.float() - (x1 - x0)).square().mean(1) * inputs["real_mask"]  # (T,)
    per_image = torch.zeros(inputs["num_segments"], device=x1.device).index_add(0, inputs["segment_ids"], err)
    lengths = torch.zeros_like(per_image).index_add(0, inputs["segment_ids"], inputs["real_mask"].float())
    loss = (per_image[: inputs["num_images"]] / lengths[: inputs["num_images"]]).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def run_mode(mode: str, args, step_grids, device, dtype, after_warmup=None) -> dict:
    """Measure one mode; `after_warmup(model, optimizer, steps)` may inspect it (profiling)."""
    from fitscale.parallel.ac import apply_ac
    from fitscale.parallel.compile import apply_compile

    parts = mode.split("+")
    backend, use_compile, use_ac = parts[0], "compile" in parts, "ac" in parts
    padded = backend == "padded"
    cudagraphs = "cudagraphs" in parts
    static = "static" in parts or cudagraphs
    if static and padded:
        return {"mode": mode, "error": "+static and +cudagraphs need a packed backend, not padded"}
    if cudagraphs and (not use_compile or device.type != "cuda"):
        return {"mode": mode, "error": "+cudagraphs needs +compile and a CUDA device"}
    overrides = {"attn_backend": backend}
    if args.depth:
        overrides["depth"] = args.depth
    if args.hidden:
        overrides["hidden_size"] = args.hidden
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(args.model, **overrides)
    model.train()
    if "bf16w" in parts:  # pure bf16 weights and optimizer state: the ceiling without fp32 master weights
        model.to(torch.bfloat16)
    float8 = {"fp8": "tensorwise", "fp8row": "rowwise"}
    recipes = [float8[part] for part in parts if part in float8]
    report = None
    if recipes:
        from fitscale.config.parallel import ParallelConfig
        from fitscale.parallel.float8 import apply_float8

        cfg = ParallelConfig(float8=recipes[0], float8_size_filter=not args.float8_all)
        try:
            report = apply_float8(model, cfg, device)
        except Exception as error:  # torchao absent, or no float8 matmuls on this GPU
            return {"mode": mode, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        print(f"{mode}: {report.summary()}", flush=True)
    if use_ac:
        apply_ac(model, "full")
    compile_modes = {
        (False, False): None,
        (True, False): "max-autotune-no-cudagraphs",
        (False, True): "reduce-overhead",
        (True, True): "max-autotune",
    }
    apply_compile(model, use_compile, mode=compile_modes["autotune" in parts, cudagraphs])
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused, foreach=None if fused else True)
    max_tokens = args.mix
    budget = max(sum(r * c for r, c in g) for g in step_grids)
    budget = -(-budget // 128) * 128  # one static token count for every packed step
    config = model.config
    steps = [
        build_step_inputs(
            g,
            config.token_dim,
            max_tokens,
            padded,
            budget,
            device,
            config.num_classes,
            args.order == "collator",
        )
        for g in step_grids
    ]
    if static and not padded:
        most = max(s["num_segments"] for s in steps)
        steps = [with_static_segments(s, most, max_tokens, config.num_classes) for s in steps]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        for i in range(args.warmup):
            train_step(model, optimizer, steps[i % len(steps)], dtype, cudagraphs)
        sync(device)
        if after_warmup is not None:
            after_warmup(model, optimizer, steps)
        start = time.perf_counter()
        for i in range(args.steps):
            loss = train_step(model, optimizer, steps[(args.warmup + i) % len(steps)], dtype, cudagraphs)
        sync(device)
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        return {"mode": mode, "error": "out of memory"}
    except Exception as error:  # one broken mode must not cost the other measurements
        return {"mode": mode, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    finally:
        del optimizer
    used = [steps[(args.warmup + i) % len(steps)] for i in range(args.steps)]
    used_grids = [step_grids[(args.warmup + i) % len(steps)] for i in range(args.steps)]
    real_tokens = sum(sum(r * c for r, c in g) for g in used_grids)
    computed_tokens = sum(int(s["cu_seqlens"][-1]) for s in used)
    flops = sum(training_flops(config, [r * c for r, c in g]) for g in used_grids)
    result = {
        "mode": mode,
        "step_ms": 1000 * elapsed / args.steps,
        "images_per_s": sum(len(g) for g in used_grids) / elapsed,
        "real_tokens_per_s": real_tokens / elapsed,
        "computed_tokens_per_s": computed_tokens / elapsed,
        "real_tflops_per_s": flops / elapsed / 1e12,
        "loss": float(loss),
    }
    if report is not None:
        result["float8_converted"] = len(report.converted)
        result["float8_kept"] = len(report.skipped)
    result["input_check_ms"] = input_check_ms(config, used, padded)
    result["input_check_share"] = result["input_check_ms"] / result["step_ms"]
    peak = peak_flops(device, args.peak_tflops)
    if peak:
        result["mfu"] = flops / elapsed / peak
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del model
    gc.collect()
    return result


def input_check_ms(config, steps: list[dict], padded: bool, repeats: int = 20) -> float:
    """Median time of the packed-batch checks FiT.forward runs on a step's inputs (included in step_ms).

    Values are read only for host tensors (no device sync), so on CUDA this times the metadata checks.
    """
    times = []
    for _ in range(repeats):
        for inputs in steps:
            x, t = inputs["x1"], torch.rand(inputs["num_segments"], device=inputs["x1"].device)
            start = time.perf_counter()
            check_packed_batch(
                x, t, inputs["labels"], inputs["pos"], inputs["cu_seqlens"], inputs["max_seqlen"], inputs["sizes"],
                token_dim=config.token_dim,
                num_classes=config.num_classes,
                padded=padded,
            )  # fmt: skip
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_flops(device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    return lookup_peak_flops(torch.cuda.get_device_name(device))


def default_modes(device) -> list[str]:
    if device.type != "cuda":
        return ["grouped", "padded"]
    modes = ["padded", "padded+compile"]
    for backend, ok in (
        ("flash", flash_attn_available()),
        ("varlen", torch_varlen_available()),
        ("flex", True),
    ):
        if ok:
            modes += [f"{backend}+compile"] if backend == "flex" else [backend, f"{backend}+compile"]
    return modes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="fitv2-xl")
    parser.add_argument("--depth", type=int, default=None, help="override the preset's depth")
    parser.add_argument(
        "--hidden", type=int, default=None, help="override the preset's width (heads stay the preset's)"
    )
    parser.add_argument(
        "--mix", type=int, default=256, choices=[256, 1024], help="token limit of the length mix"
    )
    parser.add_argument(
        "--images", type=int, default=None, help="images per step (default 64 at 256, 16 at 1024)"
    )
    parser.add_argument(
        "--modes", default=None, help="comma-separated, e.g. padded,varlen+compile,varlen+compile+ac"
    )
    parser.add_argument(
        "--order",
        default="collator",
        choices=["collator", "arrival"],
        help="packed image order: the collator's (longest first) or as drawn",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--repeats", type=int, default=1, help="passes over the modes; each keeps its fastest (shared CPUs)"
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="bf16 on CUDA, fp32 on CPU")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="MFU denominator (default: GPU table)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (torch.set_num_threads); default torch's"
    )
    parser.add_argument(
        "--float8-all",
        action="store_true",
        help="+fp8 modes: convert every linear with dims multiples of 16 (no torchao size filter)",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    images = args.images or (64 if args.mix == 256 else 16)
    distinct_steps = args.warmup + args.steps
    all_grids = imagenet_like_grids(images * distinct_steps, args.mix, seed=0)
    step_grids = [all_grids[i * images : (i + 1) * images] for i in range(distinct_steps)]
    real = sum(r * c for g in step_grids for r, c in g)
    padding_ratio = images * distinct_steps * args.mix / real
    modes = args.modes.split(",") if args.modes else default_modes(device)
    results = measure_modes(modes, args, step_grids, device, dtype)
    baseline = next((r for r in results if r["mode"] == "padded" and "error" not in r), None)
    for result in results:
        if baseline and "error" not in result:
            result["speedup_vs_padded"] = result["real_tokens_per_s"] / baseline["real_tokens_per_s"]
            if args.repeats > 1:  # every mode runs the same images: the ratio of step times
                result["speedup_vs_padded_median"] = median_ms(baseline) / median_ms(result)
    report = {
        "model": args.model,
        "depth": args.depth,
        "hidden": args.hidden,
        "mix": args.mix,
        "images_per_step": images,
        "repeats": args.repeats,
        "order": args.order,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "torch": torch.__version__,
        "padded_over_real_tokens": padding_ratio,
        "results": results,
    }
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


def measure_modes(modes: list[str], args, step_grids, device, dtype) -> list[dict]:
    """Every mode, `args.repeats` passes over the list in turn; each mode keeps its fastest pass.

    On a machine shared with other work a slow pass says more about the neighbours than about the
    mode; interleaving the passes exposes every mode to the same neighbours.
    """
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for mode in modes:
            result = run_mode(mode, args, step_grids, device, dtype)
            print(json.dumps(result), flush=True)
            kept = best.get(mode)
            passes = (kept or {}).get("step_ms_passes", []) + [result.get("step_ms")]
            if kept is None or "error" in kept or result.get("step_ms", math.inf) < kept["step_ms"]:
                kept = result
            best[mode] = {**kept, "step_ms_passes": passes}
    return list(best.values())


def median_ms(result: dict) -> float:
    """Median step time over the passes of a mode (less moved than the fastest by one lucky pass)."""
    return statistics.median(ms for ms in result["step_ms_passes"] if ms is not None)


def print_table(report: dict) -> None:
    print(
        f"\n{report['model']} depth={report['depth'] or 'preset'} hidden={report['hidden'] or 'preset'} "
        f"mix={report['mix']} on {report['device']} ({report['threads']} threads), "
        f"{report['images_per_step']} images/step, padded/real tokens = {report['padded_over_real_tokens']:.2f}"
    )
    print(
        f"{'mode':24} {'step ms':>9} {'img/s':>9} {'real tok/s':>12} {'MFU':>6} {'mem GiB':>8} {'x padded':>9}"
        f" {'(median)':>9} {'checks':>7}"
    )
    for r in report["results"]:
        if "error" in r:
            print(f"{r['mode']:24} {r['error']}")
            continue
        print(
            f"{r['mode']:24} {r['step_ms']:9.1f} {r['images_per_s']:9.1f} {r['real_tokens_per_s']:12.0f} "
            f"{r.get('mfu', float('nan')):6.1%} {r.get('peak_memory_gib', float('nan')):8.1f} "
            f"{r.get('speedup_vs_padded', float('nan')):9.2f} {r.get('speedup_vs_padded_median', float('nan')):9.2f}"
            f" {r['input_check_share']:7.2%}"
        )


if __name__ == "__main__":
    sys.exit(main())
