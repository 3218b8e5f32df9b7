"""`fitscale data stats`: what a dataset holds and how well it packs.

Packing efficiency = real tokens / computed tokens. Ours is measured by running the loader's
own `TokenPacker` over one epoch at the given token budget, every micro-batch counted as a full
budget (the static-shape case; without padding nothing is computed for the gap at all). The
release's figure pads every image to the token limit: mean tokens / limit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fitscale.data.format import (
    SAMPLE_COLUMNS,
    SAMPLES_FILE,
    TOKEN_DIM,
    atomic_write_bytes,
    check_local_shards,
    read_index,
    read_meta,
    read_sample_table,
    token_dim_of,
)
from fitscale.data.integrity import check_side_files, hash_note, recorded_hash, verify_shards
from fitscale.data.packing import SampleCatalog, SampleStream, TokenPacker
from fitscale.errors import UserError


def token_histogram(lengths: np.ndarray, limit: int) -> list[dict]:
    """Image counts per token-count bin: [1, 16), then doubling edges up to `limit` inclusive."""
    edges = [1, 16]
    while edges[-1] < limit:
        edges.append(edges[-1] * 2)
    edges.append(limit + 1)
    counts, _ = np.histogram(lengths, bins=edges)
    return [
        {"from": int(lo), "to": int(hi - 1), "images": int(c)} for lo, hi, c in zip(edges, edges[1:], counts)
    ]


def packing_efficiency(catalog: SampleCatalog, token_budget: int, lookahead: int = 512) -> tuple[float, int]:
    """(efficiency, micro-batches) of packing one epoch of `catalog` into `token_budget` bins."""
    stream = SampleStream(catalog, seed=0, shuffle=True)
    packer = TokenPacker(stream, token_budget, lookahead)
    real, bins = 0, 0
    while stream.epoch == 0:
        real += sum(image.length for image in packer.next_bin())
        bins += 1
    return real / (bins * token_budget), bins


def unpack_compressed_shards(folder: Path) -> None:
    """Decompress each compressed shard whose raw form is absent next to it, as the training
    loader's StreamingDataset does on first use (the compressed file is kept)."""
    from streaming.base.compression import decompress

    for shard in read_index(folder)["shards"]:
        raw = folder / shard["raw_data"]["basename"]
        if shard.get("zip_data") and not raw.exists():
            packed = (folder / shard["zip_data"]["basename"]).read_bytes()
            atomic_write_bytes(raw, decompress(shard["compression"], packed))


def verify_samples(folder: Path, table: np.ndarray, token_dim: int = TOKEN_DIM) -> list[str]:
    """Decode every sample and compare it with its row of samples.npy (tokens `token_dim` wide);
    problems name shard and sample."""
    from streaming.base.local import LocalDataset

    unpack_compressed_shards(folder)
    dataset = LocalDataset(str(folder))
    problems = []
    for index in range(dataset.num_samples):
        shard_id, _ = dataset.spanner[index]
        where = f"sample {index} in shard {dataset.shards[shard_id].raw_data.basename}"
        try:
            sample = dataset[index]
        except Exception as error:
            problems.append(f"{where}: cannot be read ({type(error).__name__}: {error})")
            continue
        tokens = sample["tokens"]
        if tokens.ndim != 3 or tokens.shape[2] != token_dim:
            problems.append(
                f"{where} ({sample['source']}): token shape {tuple(tokens.shape)}, width must be {token_dim}"
            )
        elif not np.isfinite(tokens).all():
            problems.append(f"{where} ({sample['source']}): NaN or inf latents")
        else:
            stored = [
                *(int(sample[c]) for c in SAMPLE_COLUMNS[:5]),
                int(tokens.shape[0] > 1),
                int(sample["source_id"]),
            ]
            differ = [
                f"{name} {int(row)} vs {value}"
                for name, row, value in zip(SAMPLE_COLUMNS, table[index], stored)
                if int(row) != value
            ]
            if differ:
                problems.append(
                    f"{where} ({sample['source']}): {SAMPLES_FILE} disagrees with the shard "
                    f"({', '.join(differ)}): the table belongs to another dataset or another order"
                )
    return problems


def dataset_stats(folder: str | Path, token_budget: int | None = None, verify: bool = False) -> dict:
    """Statistics of the dataset at `folder`: counts, skips, variants, token histogram, and the packing
    efficiency at `token_budget` tokens (8x the token limit by default) against padding each image.

    With `verify`, every shard's hash and every sample against `samples.npy` are checked and listed
    under "problems". Raises ValueError for a budget below the token limit, and the dataset's own
    errors for missing or damaged side files.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    num_samples = check_local_shards(folder)
    check_side_files(folder, meta)
    table = read_sample_table(folder, num_samples)
    limit = int(meta["max_image_tokens"])
    budget = token_budget or 8 * limit
    if budget < limit:
        raise UserError(f"--token-budget {budget} is smaller than the dataset's token limit {limit}")
    catalog = SampleCatalog(
        table,
        seed=0,
        flip_prob=0.0,
        crop_prob=0.0,
        min_tokens=int(meta["min_image_tokens"]),
        max_tokens=limit,
        token_budget=budget,
        num_classes=int(meta["num_classes"]),
        where=str(folder),
    )
    lengths = catalog.lengths[catalog.eligible]
    efficiency, bins = packing_efficiency(catalog, budget)
    stats = {
        "path": str(folder),
        "writer": meta.get("writer"),
        "dtype": meta.get("dtype"),
        "images": int(lengths.size),
        "skipped_at_write": meta.get("skipped", {}),
        "skipped_under_min_tokens": catalog.num_skipped_small,
        "with_crop_variant": int((catalog.crop_lengths > 0).sum()),
        "with_flip_variant": int(catalog.has_flip.sum()),
        "classes": int(np.unique(table[:, 4]).size),
        "tokens_total": int(lengths.sum()),
        "tokens_mean": float(lengths.mean()) if lengths.size else 0.0,
        "token_limit": limit,
        "token_histogram": token_histogram(lengths, limit),
        "token_budget": budget,
        "packed_micro_batches": bins,
        "packing_efficiency": efficiency,
        "padded_efficiency": float(lengths.mean() / limit) if lengths.size else 0.0,
    }
    index = read_index(folder)
    starts = np.concatenate([[0], np.cumsum([int(shard["samples"]) for shard in index["shards"]])])
    hash_problems, unhashed = verify_shards(folder, index, starts) if verify else ([], 0)
    if not verify:
        unhashed = sum(not recorded_hash(shard["raw_data"]) for shard in index["shards"])
    note = hash_note(meta, unhashed, len(index["shards"]))
    if note:
        stats["note"] = note
    if verify:
        stats["problems"] = hash_problems + verify_samples(folder, table, token_dim_of(meta))
    return stats


def format_stats(stats: dict) -> str:
    """The human-readable report of a `dataset_stats` dict."""
    lines = [
        f"{stats['path']}: {stats['images']} images ({stats['writer']}, {stats['dtype']}), "
        f"{stats['classes']} classes, {stats['tokens_total']} tokens (mean {stats['tokens_mean']:.1f})",
        f"skipped: {stats['skipped_under_min_tokens']} under the token minimum here, at write: "
        f"{stats['skipped_at_write'] or 'none'}",
        f"variants: {stats['with_crop_variant']} with centre crop, {stats['with_flip_variant']} with flip",
        "tokens per image:",
    ]
    peak = max((b["images"] for b in stats["token_histogram"]), default=1) or 1
    for b in stats["token_histogram"]:
        bar = "#" * round(40 * b["images"] / peak)
        lines.append(f"  {b['from']:>5}-{b['to']:<5} {b['images']:>9}  {bar}")
    lines.append(
        f"packing efficiency at a budget of {stats['token_budget']} tokens: {100 * stats['packing_efficiency']:.2f}% "
        f"({stats['packed_micro_batches']} micro-batches); padding each image to {stats['token_limit']} "
        f"tokens (release): {100 * stats['padded_efficiency']:.2f}%"
    )
    if "note" in stats:
        lines.append(f"note: {stats['note']}")
    if "problems" in stats:
        lines.append(f"verify: {len(stats['problems'])} problems")
        lines += [f"  {p}" for p in stats["problems"][:50]]
    return "\n".join(lines)
