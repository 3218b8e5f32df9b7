"""Integrity of a latent dataset: every file checked against a hash recorded when it was written.

The chain (written by fitscale/data/writer.py):
- every MDS shard: its hash in `index.json` (`raw_data.hashes`, and `zip_data.hashes` for the
  compressed file), computed by Streaming's `MDSWriter(hashes=["xxh64"])`;
- `index.json` and `samples.npy`: their hashes in `fitscale.json` (`hashes`), written last.
So a flipped bit in a shard, two same-size shards swapped, an index from another write or a
`samples.npy` from another dataset each break one link, and the error names the file.

Checked:
- `samples.npy` and `index.json` against `fitscale.json` whenever a loader or `data stats` opens
  the dataset (`check_side_files`: a hash of two small files);
- each shard when a reader first maps it (`data.verify_shards`, on by default; one xxh64 pass
  over the shard per reading process, ~13 GB/s: see docs/benchmarks.md) and every shard by
  `fitscale data stats --verify`, which also decodes every sample and compares it with its row
  of `samples.npy`.
Datasets written before hashes were recorded stay readable: `data stats` says "no hashes recorded".
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fitscale.data.format import INDEX_FILE, META_FILE, SAMPLES_FILE
from fitscale.errors import UserError

HASH = "xxh64"  # what the writer records (MDSWriter's and ours)
SIDE_FILES = (INDEX_FILE, SAMPLES_FILE)


class DatasetIntegrityError(UserError):
    """A dataset file does not match the hash recorded for it when the dataset was written."""


def _hasher(algo: str):
    import xxhash

    if hasattr(xxhash, algo):
        return getattr(xxhash, algo)()
    return hashlib.new(algo)


def digest(chunks: bytes | memoryview | Iterable[bytes], algo: str = HASH) -> str:
    """Hex digest of bytes (or of chunks in order), as Streaming's `get_hash` writes it."""
    hasher = _hasher(algo)
    for chunk in [chunks] if isinstance(chunks, (bytes, bytearray, memoryview)) else chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def file_digest(path: Path, algo: str = HASH, chunk: int = 1 << 24) -> str:
    """Hex digest (`algo`, xxh64 by default) of a file's bytes, read `chunk` bytes at a time."""
    with open(path, "rb") as handle:
        return digest(iter(lambda: handle.read(chunk), b""), algo)


def side_file_hashes(folder: Path) -> dict[str, str]:
    """What the writer records in fitscale.json: {file name: xxh64} of index.json and samples.npy."""
    return {name: file_digest(folder / name) for name in SIDE_FILES}


def check_side_files(folder: str | Path, meta: dict[str, Any]) -> None:
    """index.json and samples.npy are the ones this dataset's fitscale.json was written with."""
    folder = Path(folder)
    recorded = meta.get("hashes") or {}
    for name in SIDE_FILES:
        if name not in recorded or not (folder / name).exists():
            continue  # no hash recorded (an older dataset), or a missing file named by its reader
        found = file_digest(folder / name)
        if found != recorded[name]:
            raise DatasetIntegrityError(
                f"{folder / name} does not belong to this dataset: its {HASH} is {found}, "
                f"{META_FILE} records {recorded[name]} (a file from another dataset or a damaged copy); "
                "restore the dataset's own file or rewrite the dataset"
            )


def shard_hash_problem(path: Path, entry: dict[str, Any], data: Any = None) -> str | None:
    """Why a stored shard file differs from its index entry (`raw_data` or `zip_data`), or None.

    `data`: the file's bytes when already mapped (a buffer); otherwise the file is read.
    None too when the entry records no hash (see `recorded_hash`).
    """
    recorded = recorded_hash(entry)
    if recorded is None:
        return None
    algo, expected = recorded
    found = digest(memoryview(data), algo) if data is not None else file_digest(path, algo)
    if found == expected:
        return None
    return (
        f"shard {path}: {algo} {found}, {INDEX_FILE} records {expected}: its bytes changed after it "
        "was written (damaged, or another shard of the same size in its place); restore it or rewrite "
        "the dataset"
    )


def recorded_hash(entry: dict[str, Any]) -> tuple[str, str] | None:
    """(algorithm, hex digest) recorded in an MDS index entry, xxh64 preferred; None when none was
    recorded.
    """
    hashes = entry.get("hashes") or {}
    for algo in (HASH, *sorted(hashes)):
        if algo in hashes:
            return algo, hashes[algo]
    return None


def verify_shards(folder: Path, index: dict[str, Any], starts: np.ndarray) -> tuple[list[str], int]:
    """(problems, shards without a recorded hash): every stored shard file against its hash.

    `starts[k]` is the global index of shard k's first sample, to name the samples a damaged shard holds.
    """
    problems, unhashed = [], 0
    for k, shard in enumerate(index["shards"]):
        entries = [shard[key] for key in ("raw_data", "zip_data") if shard.get(key)]
        present = [e for e in entries if (folder / e["basename"]).exists()]
        if not any(recorded_hash(e) for e in entries):
            unhashed += 1
            continue
        for entry in present:
            problem = shard_hash_problem(folder / entry["basename"], entry)
            if problem:
                problems.append(f"{problem} (samples {int(starts[k])}-{int(starts[k + 1]) - 1})")
    return problems, unhashed


def hash_note(meta: dict[str, Any], unhashed: int, shards: int) -> str | None:
    """A line for `data stats` when some files have no recorded hash (datasets of older writers)."""
    missing = [name for name in SIDE_FILES if name not in (meta.get("hashes") or {})]
    if not unhashed and not missing:
        return None
    parts = []
    if unhashed:
        parts.append(f"{unhashed} of {shards} shards")
    if missing:
        parts.append(" and ".join(missing))
    return (
        f"no hashes recorded for {', '.join(parts)}: damage there cannot be detected; rewrite the "
        "dataset with this version to record them"
    )
