"""Inception features of a batch computed in parts over ranks, kept on disk, resumed, then reduced.

A batch of N pictures is cut into parts of `part_size` consecutive images (part k holds images
[k * part_size, (k + 1) * part_size)); rank r computes parts r, r + W, r + 2W, ... and writes each
as `part-KKKKKK.npz` (pool, spatial, softmax; float32) through a temporary file and a rename, so a
part on disk is whole. Inside a part the network sees batches of `batch_size` images counted from
the part's start, so every image goes through the network in the same batch whatever the number
of ranks: the features, and every number computed from them, do not depend on it (bit for bit on
one machine). An interrupted evaluation finds its parts and computes only the missing ones.

Rank 0 then reads the parts in index order, one at a time: the FID statistics as float64 sums of
x and x x^T (pool and spatial), and the pool features (precision and recall) and softmax
(Inception Score) gathered. Memory is bounded by those features, not by the pictures. The folder
(`work`) must be one every rank sees (a shared filesystem across nodes).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fitscale.errors import UserError
from fitscale.eval.adm import FIDStatistics, statistics_from_sums
from fitscale.eval.inception import FEATURE_WIDTHS

PART_SIZE = 1000  # images per part file
BATCH_SIZE = 64  # ADM's Evaluator(batch_size=64)
MANIFEST = "batch.json"


def part_path(work: Path, k: int) -> Path:
    """The file of part k."""
    return work / f"part-{k:06d}.npz"


def _barrier(world_size: int) -> None:
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def check_manifest(work: Path, manifest: dict, rank: int, world_size: int) -> None:
    """Record which batch `work` holds features of (rank 0, once) and refuse a folder that holds
    another's: ValueError naming the folder and the field that differs."""
    path = work / MANIFEST
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(manifest, indent=1))
            tmp.replace(path)
    _barrier(world_size)
    held = json.loads(path.read_text())
    for key, value in manifest.items():
        if held.get(key) != value:
            raise UserError(
                f"{work} holds features of another evaluation ({key}: {held.get(key)!r}, now {value!r}); "
                "pass another --work folder or remove that one"
            )


def extract_parts(
    batch,
    features_of,
    work: Path,
    rank: int = 0,
    world_size: int = 1,
    part_size: int = PART_SIZE,
    batch_size: int = BATCH_SIZE,
) -> int:
    """Write this rank's missing parts of `batch` (an eval.batches source) into `work`; returns how
    many it computed. `features_of` is a callable returning an InceptionFeatures (called only when
    a part is missing, so a finished evaluation never loads the network)."""
    parts = (batch.count + part_size - 1) // part_size
    computed = 0
    net = None
    for k in range(rank, parts, world_size):
        path = part_path(work, k)
        if path.is_file():
            continue
        net = net or features_of()
        start, stop = k * part_size, min((k + 1) * part_size, batch.count)
        chunks = {name: [] for name in FEATURE_WIDTHS}
        for begin in range(start, stop, batch_size):
            features = net(batch.read(begin, min(begin + batch_size, stop)))
            for name in FEATURE_WIDTHS:
                chunks[name].append(getattr(features, name))
        tmp = path.with_name(path.name + f".rank{rank}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **{name: np.concatenate(values) for name, values in chunks.items()})
        tmp.replace(path)
        computed += 1
    _barrier(world_size)
    return computed


def _parts(work: Path, count: int, part_size: int):
    for k in range((count + part_size - 1) // part_size):
        path = part_path(work, k)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a rank stopped early; rerun to compute it")
        with np.load(path) as part:
            yield {name: part[name] for name in FEATURE_WIDTHS}


@dataclass
class Reduced:
    """A batch's features reduced on rank 0: FID statistics of pool and spatial features, the
    gathered pool (N, 2048) and softmax (N, 1008) features, float32."""

    count: int
    pool_stats: FIDStatistics
    spatial_stats: FIDStatistics
    pool: np.ndarray
    softmax: np.ndarray


def reduce_parts(work: Path, count: int, part_size: int = PART_SIZE, gather: bool = True) -> Reduced:
    """Read the parts in index order and reduce them (see the module docstring). `gather=False`
    keeps only the statistics (a reference set of a million pictures: pool and softmax empty)."""
    sums = {name: np.zeros(FEATURE_WIDTHS[name]) for name in ("pool", "spatial")}
    outer = {name: np.zeros((FEATURE_WIDTHS[name],) * 2) for name in ("pool", "spatial")}
    kept = count if gather else 0
    pool = np.empty((kept, FEATURE_WIDTHS["pool"]), dtype=np.float32)
    softmax = np.empty((kept, FEATURE_WIDTHS["softmax"]), dtype=np.float32)
    start = 0
    for part in _parts(work, count, part_size):
        for name in ("pool", "spatial"):
            x = part[name].astype(np.float64)
            sums[name] += x.sum(0)
            outer[name] += x.T @ x
        if gather:
            pool[start : start + len(part["pool"])] = part["pool"]
            softmax[start : start + len(part["pool"])] = part["softmax"]
        start += len(part["pool"])
    return Reduced(
        count,
        statistics_from_sums(count, sums["pool"], outer["pool"]),
        statistics_from_sums(count, sums["spatial"], outer["spatial"]),
        pool,
        softmax,
    )


def write_features(work: Path, count: int, out: Path, part_size: int = PART_SIZE) -> None:
    """`out` (.npz) with `pool` (N, 2048), `spatial` (N, 2023), `softmax` (N, 1008), float32,
    written part by part (never the whole set in memory) through a temporary file and a rename."""
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, width in FEATURE_WIDTHS.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                header = {"descr": "<f4", "fortran_order": False, "shape": (count, width)}
                np.lib.format.write_array_header_2_0(member, header)
                for part in _parts(work, count, part_size):
                    member.write(np.ascontiguousarray(part[name], dtype="<f4").tobytes())
    tmp.replace(out)
