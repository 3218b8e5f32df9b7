"""Loader throughput: fitscale's Streaming loader vs one safetensors file per image.

The baseline is the release's way: a plain PyTorch DataLoader whose dataset opens one
safetensors file per image (`feature` (2, h, w, 16)), picks a flip and pads the image to the
token limit. Both read the same synthetic images; both use N worker processes.

    python tools/bench_data.py --num-images 4000 --workers 2 --out /tmp/bench_data
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


class PerFileDataset(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], limit: int):
        self.files, self.limit = files, limit

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from safetensors.torch import load_file

        tensors = load_file(self.files[index])
        feature = tensors["feature"][index % 2].reshape(-1, 16).float()
        padded = torch.zeros(self.limit, 16)
        padded[: feature.shape[0]] = feature
        return padded, feature.shape[0], int(tensors["label"])


def write_per_file(folder: Path, dataset: Path) -> list[Path]:
    from safetensors.numpy import save_file
    from streaming.base.local import LocalDataset

    folder.mkdir(parents=True, exist_ok=True)
    data, files = LocalDataset(str(dataset)), []
    for index in range(data.num_samples):
        sample = data[index]
        path = folder / f"{index:07d}.safetensors"
        if not path.exists():
            feature = sample["tokens"].reshape(2, sample["rows"], sample["cols"], 16)
            size = np.array([sample["rows"], sample["cols"]])
            save_file({"feature": feature, "size": size, "label": np.array(sample["label"])}, str(path))
        files.append(path)
    return files


def bench_per_file(files: list[Path], limit: int, workers: int, batch: int) -> dict:
    loader = torch.utils.data.DataLoader(
        PerFileDataset(files, limit), batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )
    images = tokens = 0
    start = time.perf_counter()
    for _, lengths, _ in loader:
        images += len(lengths)
        tokens += int(lengths.sum())
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "real_tokens_per_s": tokens / seconds, "seconds": seconds}


def bench_ours(dataset: Path, workers: int, batch: int, budget: int, num_images: int) -> dict:
    from fitscale.config.data import DataConfig
    from fitscale.data import build_loader

    cfg = DataConfig(path=str(dataset), global_batch_size=batch, token_budget=budget, num_workers=workers)
    loader = build_loader(cfg, 0, 1)
    images = tokens = 0
    start = time.perf_counter()
    for step in loader:
        images += sum(mb.num_images for mb in step.micro_batches)
        tokens += sum(mb.num_real_tokens for mb in step.micro_batches)
        if images >= num_images - batch:
            break
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "real_tokens_per_s": tokens / seconds, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench_data")
    parser.add_argument("--num-images", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=8192)
    args = parser.parse_args()

    from fitscale.data.sources import build_synth
    from fitscale.data.writer import WriteSettings, write_dataset

    out = Path(args.out)
    dataset = out / "mds"
    if not (dataset / "fitscale.json").exists():
        settings = WriteSettings(writer="synth", options={"seed": 0, "num_images": args.num_images})
        write_dataset(dataset, range(args.num_images), build_synth(0, 256, 1000, "float16"), settings)
    files = write_per_file(out / "files", dataset)
    ours = bench_ours(dataset, args.workers, args.batch, args.token_budget, args.num_images)
    baseline = bench_per_file(files, 256, args.workers, args.batch)
    print(
        json.dumps(
            {
                "images": args.num_images,
                "workers": args.workers,
                "fitscale": ours,
                "per_file": baseline,
                "speedup_images": ours["images_per_s"] / baseline["images_per_s"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
