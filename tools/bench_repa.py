"""Training-step time of FiTv2 with and without REPA (docs/repa.md): the same packed images, one
full step (forward, backward, AdamW) each, the frozen encoder's time reported on its own.

The encoder's weights are random (the time does not depend on them) and each image's pixels are
random at 16 px per token, as a dataset written with pixels holds them for an 8x VAE with 2x2
patches. Eager blocks (no compile) in both modes, so the ratio is REPA's cost alone.

    python tools/bench_repa.py --model fitv2-xl --block 10 --json out.json            # one GPU
    python tools/bench_repa.py --model tiny --block 1 --encoder vit_tiny_patch16_224 --images 4 --steps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from bench_train import imagenet_like_grids

from fitscale.config.repa import RepaConfig
from fitscale.config.train import FlowConfig
from fitscale.data.batch import pack_images
from fitscale.flow.loss import flow_loss
from fitscale.flow.repa import attach_projector, repa_loss
from fitscale.flow.repa_encoder import FrozenEncoder, create_encoder
from fitscale.models import build_model


class RandomPixels:
    """A stand-in PixelStore: random uint8 pixels of any grid at `ppt` px per token."""

    def __init__(self, ppt: int = 16):
        self.pixels_per_token, self.rng = ppt, np.random.default_rng(0)

    def image(self, source_id: int, rows: int, cols: int, flip: bool = False) -> np.ndarray:
        return self.rng.integers(
            0, 256, (rows * self.pixels_per_token, cols * self.pixels_per_token, 3), np.uint8
        )


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fitv2-xl")
    parser.add_argument("--encoder", default="vit_base_patch14_dinov2")
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--images", type=int, default=32, help="images per step (256-token mix)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = Path("/tmp/bench_repa_encoder.pt")
    repa = RepaConfig(encoder=args.encoder, encoder_weights=str(weights), block=args.block)
    torch.save(create_encoder(repa).state_dict(), weights)
    encoder = FrozenEncoder(repa, device, 16)
    with torch.device(device):
        model = build_model(args.model, attn_backend="auto" if device.type == "cuda" else "grouped")
        attach_projector(model, repa, encoder.dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    grids = imagenet_like_grids(args.images, 256, seed=0)
    tokens = [torch.randn(r * c, model.config.token_dim) for r, c in grids]
    host = pack_images(tokens, grids, [0] * len(grids), list(range(len(grids))))
    batch = host.to(device)
    t = torch.rand(batch.num_segments, device=device)
    noise = torch.randn_like(batch.tokens)
    store = RandomPixels()
    results = {}
    for mode in ("plain", "repa"):
        times, encoder_times = [], []
        for step in range(args.warmup + args.steps):
            sync(device)
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = flow_loss(
                    model, batch, t, noise, len(grids), FlowConfig(), args.block if mode == "repa" else None
                )
                loss = out.loss
                if mode == "repa":
                    target = encoder.features(host, store)
                    loss = loss + 0.5 * repa_loss(out.hidden, target, batch, len(grids))[0]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - started)
                encoder_times.append(encoder.take_seconds())
            else:
                encoder.take_seconds()
        results[mode] = {
            "step_ms": 1000 * statistics.median(times),
            "encoder_ms": 1000 * statistics.median(encoder_times),
        }
    results["repa_over_plain"] = results["repa"]["step_ms"] / results["plain"]["step_ms"]
    report = {
        "model": args.model,
        "encoder": args.encoder,
        "block": args.block,
        "images": len(grids),
        "device": str(device),
        **results,
    }
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
