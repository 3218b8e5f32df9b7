"""What batch invariance and per-image step control cost: an ODE sampler over one packed batch of
mixed sizes, solved three ways, with a random model (weights do not change the cost per forward).

  shared     one torchdiffeq solve of the whole packed batch (the release's way: one step size,
             so every image depends on its batch)
  per-image  one solve per image, their velocity calls batched into shared forwards
             (`fitscale sample --no-batch-invariant`)
  one-by-one one solve per image, each image its own forwards: `fitscale sample`'s default
             (batch-invariant) way; the tool checks it is bit for bit what generate_latents gives

python tools/bench_sampling.py --threads 1                       # CPU, tiny model
python tools/bench_sampling.py --model fitv2-b --depth 4 --sampler bosh3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fitscale.flow.guidance import PackedVelocity
from fitscale.flow.per_image import integrate_per_image
from fitscale.flow.samplers import TOLERANCE_METHODS, integrate
from fitscale.models import build_model
from fitscale.sample.generate import generate_latents
from fitscale.sample.options import SamplingOptions
from fitscale.sample.plan import initial_noise, pack_layout, plan_items, split_latents

SIZES = [(64, 64), (96, 128), (128, 96), (48, 160)]  # pixels: 16, 48, 48 and 30 tokens


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--sampler", default="dopri5")
    parser.add_argument("--atol", type=float, default=1e-6)
    parser.add_argument("--rtol", type=float, default=1e-3)
    parser.add_argument("--per-size", type=int, default=2, help="images of each of the 4 sizes")
    parser.add_argument("--cfg", type=float, default=1.5)
    parser.add_argument("--noise", type=float, default=0.05, help="std of the random weights added")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each way; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    overrides = {k: v for k, v in (("depth", args.depth), ("hidden_size", args.hidden)) if v is not None}
    if device.type == "cpu":
        overrides["attn_backend"] = "reference"
    torch.manual_seed(0)
    model = build_model(args.model, **overrides)
    with torch.no_grad():
        for param in model.parameters():  # the released init zeroes the output layer
            param.add_(torch.randn_like(param) * args.noise)
    model = model.to(device).eval()
    items = plan_items(SIZES, args.per_size, model.config.num_classes, seed=0)
    states = [initial_noise(item, model.config.token_dim, 0).to(device) for item in items]
    layout = pack_layout(items, device)
    # Grid samplers take the default 50 steps, the others these tolerances.
    tolerances = dict(atol=args.atol, rtol=args.rtol) if args.sampler in TOLERANCE_METHODS else {}

    def timed(run):
        best = float("inf")
        for _ in range(args.repeat):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return out, best

    velocity = PackedVelocity(model, layout, args.cfg)
    velocity(torch.cat(states), torch.tensor(0.5))  # warm-up
    shared, shared_s = timed(lambda: integrate(velocity, torch.cat(states), args.sampler, **tolerances))
    per_image, per_image_s = timed(
        lambda: integrate_per_image(velocity.images, states, args.sampler, **tolerances)
    )

    def one_by_one():
        results = []
        for item, state in zip(items, states):
            single = PackedVelocity(model, pack_layout([item], device), args.cfg)
            results.append(integrate(single, state, args.sampler, **tolerances))
        return results

    alone, alone_s = timed(one_by_one)
    options = SamplingOptions(sampler=args.sampler, **tolerances, cfg_scale=args.cfg)  # batch-invariant
    product = generate_latents(model, items, options)
    expected = split_latents(torch.cat([r.x for r in alone]), items, model.config.in_channels)
    assert all(torch.equal(a, b) for a, b in zip(product, expected)), "one-by-one is not generate_latents"
    shared_images = shared.x.split([item.tokens for item in items])
    moved = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(shared_images, per_image.xs))
    report = {
        "device": torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()}",
        "model": args.model,
        "overrides": overrides,
        "sampler": args.sampler,
        **tolerances,
        "cfg": args.cfg,
        "images": len(items),
        "tokens": layout.num_tokens,
        # token_evaluations: image tokens through the model (doubled by guidance), the CPU's cost
        "shared": {
            "forwards": shared.evaluations,
            "token_evaluations": shared.evaluations * layout.num_tokens,
            "seconds": round(shared_s, 3),
        },
        "per_image": {
            "forwards": per_image.calls,
            "evaluations_per_image": per_image.evaluations,
            "token_evaluations": sum(n * item.tokens for n, item in zip(per_image.evaluations, items)),
            "seconds": round(per_image_s, 3),
        },
        "one_by_one": {"forwards": sum(r.evaluations for r in alone), "seconds": round(alone_s, 3)},
        "shared_vs_per_image_max_relative_difference": moved,
    }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
