"""Loader throughput: fitscale's Streaming loader vs one safetensors file per image.

The baseline is the release's way: a plain PyTorch DataLoader whose dataset opens one
safetensors file per image (`feature` (2, h, w, 16), `grid`, `size`, `label`), picks the resized
or the centre-crop file and a flip at random, pads tokens, grid and mask to the token limit and
goes through the default collate. Its workers persist across epochs (kinder to the baseline than
restarting them every epoch). fitscale's loader runs in "images" mode with the same batch of
images per step, the same worker count and the same flip / crop probabilities, on the same
images written as MDS shards (or, with `--batch-mode tokens`, one micro-batch filled to the
token budget per step).

Each loader runs in its own process, alternating, `--rounds` times. Start-up (construction to
first batch) is reported apart from the steady state: images and real (unpadded) tokens per
second over a fixed window that begins after `--warmup` seconds of batches.

    python tools/bench_data.py --num-images 30000 --workers 2 --out /tmp/bench_data

`--remote`: the same MDS dataset uploaded to a local S3 server (moto's, `python -m moto.server`,
over HTTP on localhost) with `fitscale data upload`, then fitscale's loader with
`data.remote=s3://...` from a cold cache (a fresh `data.path` each round): images/s and real
tokens/s over the whole first epoch, construction included. Beside it, each stage alone over the
same shards: download (boto3, one stream, as a Streaming worker fetches), xxh64 hashing, and the
warm-cache loader (reading and packing), so the slowest names the limit.

    python tools/bench_data.py --remote --num-images 10000 --workers 2 --out /tmp/bench_remote
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

LIMIT = 256  # token limit the dataset is written for (256x256 images)
TOKEN_DIM = 16


class PerFileDataset(torch.utils.data.Dataset):
    """The release's dataset: one file per image (two for images with a centre-crop variant)."""

    def __init__(self, files: list[list[Path]], limit: int):
        self.files, self.limit = files, limit

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        tensors = load_file(random.choice(self.files[index]))
        feature = tensors["feature"][random.randrange(2)].reshape(-1, TOKEN_DIM).float()
        length = feature.shape[0]
        tokens = torch.zeros(self.limit, TOKEN_DIM)
        tokens[:length] = feature
        grid = torch.zeros(2, self.limit, dtype=torch.int64)
        grid[:, :length] = tensors["grid"]
        mask = torch.zeros(self.limit, dtype=torch.bool)
        mask[:length] = True
        return {
            "tokens": tokens,
            "grid": grid,
            "mask": mask,
            "size": tensors["size"],
            "label": tensors["label"],
        }


def release_file(path: Path, variants: np.ndarray, rows: int, cols: int, label: int) -> None:
    from safetensors.numpy import save_file

    feature = np.ascontiguousarray(variants.reshape(2, rows, cols, TOKEN_DIM))
    row, col = np.divmod(np.arange(rows * cols), cols)
    grid = np.stack([col, row]).astype(np.int64)  # column then row index, as released
    size = np.array([rows, cols], np.int64)
    save_file({"feature": feature, "grid": grid, "size": size, "label": np.array(label)}, str(path))


def write_per_file(folder: Path, dataset: Path) -> list[list[Path]]:
    """The MDS dataset as release-style files; resized and crop variants as separate files."""
    from streaming.base.local import LocalDataset

    listing = folder / "files.json"
    if listing.exists():
        return [[folder / name for name in names] for names in json.loads(listing.read_text())]
    folder.mkdir(parents=True, exist_ok=True)
    data, files = LocalDataset(str(dataset)), []
    for index in range(data.num_samples):
        resized, crop = folder / f"{index:07d}.safetensors", folder / f"{index:07d}_crop.safetensors"
        sample = None
        if not resized.exists():
            sample = data[index]
            release_file(resized, sample["tokens"], sample["rows"], sample["cols"], sample["label"])
            if sample["crop_rows"]:
                release_file(crop, sample["crop"], sample["crop_rows"], sample["crop_cols"], sample["label"])
        files.append([resized, crop] if crop.exists() else [resized])
    listing.write_text(json.dumps([[path.name for path in paths] for paths in files]))
    return files


def per_file_batches(args: argparse.Namespace, files: list[list[Path]]) -> Iterator[tuple[int, int]]:
    loader = torch.utils.data.DataLoader(
        PerFileDataset(files, LIMIT),
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        drop_last=True,
        persistent_workers=args.workers > 0,
    )
    while True:
        for batch in loader:
            yield int(batch["mask"].shape[0]), int(batch["mask"].sum())


def fitscale_batches(args: argparse.Namespace, remote: str | None = None) -> Iterator[tuple[int, int]]:
    """fitscale's loader over the local dataset, or over `remote` into the cold cache `--cache`."""
    from fitscale.config.data import DataConfig
    from fitscale.data import build_loader

    cfg = DataConfig(
        path=args.cache if remote else str(Path(args.out) / "mds"),
        remote=remote,
        global_batch_size=args.batch,
        token_budget=args.token_budget,
        num_workers=args.workers,
        max_image_tokens=LIMIT,
        batch_mode=args.batch_mode,
    )
    for step in build_loader(cfg, 0, 1):
        yield (
            sum(mb.num_images for mb in step.micro_batches),
            sum(mb.num_real_tokens for mb in step.micro_batches),
        )


def cpu_seconds() -> float | None:
    """CPU time so far of this process and its worker processes (Linux /proc), load-independent."""
    tick = os.sysconf("SC_CLK_TCK")
    total, pids = 0.0, [os.getpid()]
    try:
        while pids:
            pid = pids.pop()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
            for task in Path(f"/proc/{pid}/task").iterdir():
                pids += (task / "children").read_text().split()
    except OSError:
        return None
    return total


def measure(batches: Iterator[tuple[int, int]], start: float, warmup: float, window: float) -> dict:
    """Start-up to the first batch, then throughput and CPU per image over `window` seconds
    after `warmup`. CPU per image barely depends on what else the machine runs; throughput does."""
    next(batches)
    startup = time.perf_counter() - start
    began = time.perf_counter()
    for _ in batches:
        if time.perf_counter() - began >= warmup:
            break
    images = tokens = 0
    cpu, began = cpu_seconds(), time.perf_counter()
    for num_images, num_tokens in batches:
        images, tokens = images + num_images, tokens + num_tokens
        seconds = time.perf_counter() - began
        if seconds >= window:
            break
    cpu = None if cpu is None else cpu_seconds() - cpu
    batches.close()
    return {
        "cpu_us_per_image": None if cpu is None else 1e6 * cpu / images,
        "startup_s": startup,
        "images_per_s": images / seconds,
        "real_tokens_per_s": tokens / seconds,
        "measured_images": images,
    }


def prepare(args: argparse.Namespace, per_file: bool = True) -> None:
    from fitscale.data.sources import build_synth
    from fitscale.data.writer import WriteSettings, write_dataset

    dataset = Path(args.out) / "mds"
    if not (dataset / "fitscale.json").exists():
        settings = WriteSettings(writer="synth", options={"seed": 0, "num_images": args.num_images})
        write_dataset(dataset, range(args.num_images), build_synth(0, LIMIT, 1000, "float16"), settings)
    meta = json.loads((dataset / "fitscale.json").read_text())
    if meta["num_samples"] != args.num_images:
        raise SystemExit(
            f"{dataset} holds {meta['num_samples']} images, not {args.num_images}; use another --out"
        )
    if per_file:
        write_per_file(Path(args.out) / "files", dataset)


def measure_first_epoch(batches: Iterator[tuple[int, int]], start: float, num_images: int) -> dict:
    """Images and real tokens per second from construction until one epoch of images is out, the
    start-up (construction to first batch) and the rate after the first batch."""
    images = tokens = 0
    first_at = first_images = first_tokens = None
    for count, real in batches:
        images, tokens = images + count, tokens + real
        if first_at is None:
            first_at, first_images, first_tokens = time.perf_counter(), images, tokens
        if images >= num_images:
            break
    end = time.perf_counter()
    batches.close()
    after = end - first_at
    return {
        "images_per_s": images / (end - start),
        "real_tokens_per_s": tokens / (end - start),
        "seconds": end - start,
        "startup_s": first_at - start,
        "images_per_s_after_first_batch": (images - first_images) / after if after > 0 else None,
        "real_tokens_per_s_after_first_batch": (tokens - first_tokens) / after if after > 0 else None,
    }


def start_s3_server(port: int) -> subprocess.Popen:
    """moto's S3 server on 127.0.0.1:`port`, in a process of its own, once it accepts connections."""
    import socket

    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"moto server on port {port} did not start")


def stage_rates(dataset: Path, uri: str) -> dict:
    """Each stage alone over every shard: download (boto3, one stream) and xxh64 hashing, in MB/s."""
    import tempfile

    import xxhash

    from fitscale.data.format import read_index, shard_files
    from fitscale.data.remote import s3_client, split_s3

    bucket, prefix = split_s3(uri, "--remote")
    client, names = s3_client(), [name for name, _ in shard_files(read_index(dataset))]
    total = sum((dataset / name).stat().st_size for name in names)
    with tempfile.TemporaryDirectory() as folder:
        began = time.perf_counter()
        for i, name in enumerate(names):
            client.download_file(bucket, f"{prefix}/{name}", f"{folder}/{i}")
        download = time.perf_counter() - began
        began = time.perf_counter()
        for i in range(len(names)):
            xxhash.xxh64(Path(f"{folder}/{i}").read_bytes()).hexdigest()
        hashing = time.perf_counter() - began
    return {
        "shard_mb": total / 1e6,
        "download_mb_per_s": total / 1e6 / download,
        "hash_mb_per_s": total / 1e6 / hashing,
    }


def remote_main(args: argparse.Namespace) -> None:
    """The --remote benchmark (see the module docstring); prints JSON."""
    import shutil

    from fitscale.data.remote import upload_dataset
    from fitscale.runtime.local import free_port

    prepare(args, per_file=False)
    dataset = Path(args.out) / "mds"
    port = free_port()
    server = start_s3_server(port)
    os.environ.update(
        S3_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    uri = "s3://bench/synth"
    try:
        from fitscale.data.remote import s3_client

        s3_client().create_bucket(Bucket="bench")
        began = time.perf_counter()
        upload_dataset(dataset, uri, progress=False)
        upload_s = time.perf_counter() - began
        stages = stage_rates(dataset, uri)
        cold, warm = [], []
        for round_ in range(args.rounds):
            cache = Path(args.out) / f"cache-{round_}"
            shutil.rmtree(cache, ignore_errors=True)
            command = [sys.executable, __file__, *sys.argv[1:], "--only", "remote", "--remote-uri", uri]
            output = subprocess.run(
                [*command, "--cache", str(cache)], check=True, capture_output=True, text=True
            )
            cold.append(json.loads(output.stdout.strip().splitlines()[-1]))
            command = [sys.executable, __file__, *sys.argv[1:], "--only", "fitscale"]
            output = subprocess.run(command, check=True, capture_output=True, text=True)
            warm.append(json.loads(output.stdout.strip().splitlines()[-1]))
    finally:
        server.terminate()
        server.wait()
    per_image_mb = stages["shard_mb"] / args.num_images
    rates = {
        "download": stages["download_mb_per_s"] / per_image_mb,
        "hashing": stages["hash_mb_per_s"] / per_image_mb,
        "decode and packing (warm cache)": statistics.median(r["images_per_s"] for r in warm),
    }
    print(
        json.dumps(
            {
                "images": args.num_images,
                "workers": args.workers,
                "upload_s": upload_s,
                "stages_mb_per_s": stages,
                "stage_images_per_s": rates,
                "cold_first_epoch": cold,
                "warm": warm,
                "limit": min(rates, key=rates.get),
                "node_demand_images_per_s": 3200,
            },
            indent=1,
        )
    )


def run_one(args: argparse.Namespace) -> dict:
    if args.only == "remote":
        start = time.perf_counter()
        return measure_first_epoch(fitscale_batches(args, args.remote_uri), start, args.num_images)
    if args.only == "fitscale":
        start = time.perf_counter()
        batches = fitscale_batches(args)
    else:
        files = write_per_file(Path(args.out) / "files", Path(args.out) / "mds")  # the file listing
        start = time.perf_counter()
        batches = per_file_batches(args, files)
    return measure(batches, start, args.warmup, args.window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench_data")
    parser.add_argument("--num-images", type=int, default=30000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--token-budget", type=int, default=8192)
    parser.add_argument(
        "--batch-mode",
        choices=("images", "tokens"),
        default="images",
        help="fitscale's: --batch images per step, or one micro-batch of --token-budget tokens per step",
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of batches before measuring")
    parser.add_argument("--window", type=float, default=20.0, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each loader, alternating")
    parser.add_argument("--remote", action="store_true", help="from a local S3 server with a cold cache")
    parser.add_argument("--only", choices=("fitscale", "per_file", "remote"), help=argparse.SUPPRESS)
    parser.add_argument("--remote-uri", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_one(args)))
        return
    if args.remote:
        remote_main(args)
        return
    prepare(args)
    runs: dict[str, list[dict]] = {"fitscale": [], "per_file": []}
    for _ in range(args.rounds):
        for name in runs:
            command = [sys.executable, __file__, *sys.argv[1:], "--only", name]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(output.strip().splitlines()[-1]))
    summary = {
        name: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for name, results in runs.items()
    }
    print(
        json.dumps(
            {
                "images": args.num_images,
                "workers": args.workers,
                "batch_mode": args.batch_mode,
                "runs": runs,
                "median": summary,
                "speedup_images": summary["fitscale"]["images_per_s"] / summary["per_file"]["images_per_s"],
                "speedup_real_tokens": summary["fitscale"]["real_tokens_per_s"]
                / summary["per_file"]["real_tokens_per_s"],
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
