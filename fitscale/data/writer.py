"""Write latent datasets resumably: numbered parts, each made visible only when complete.

Every writer (`synth`, `digits`, `from-images`, `from-fit-latents`) lists its inputs in a fixed
order and hands them here. The inputs are cut into parts of `part_size`; part k is written as
MDS shards into `parts/part-0000k.tmp/` and renamed to `parts/part-0000k/` when finished, so an
interrupted write loses at most the part in progress and rerunning the same command continues
from there. Ranks of a split write (`rank`, `world_size`) take every `world_size`-th part; the
process that finds all parts complete merges them (one at a time, under `parts/.merge.lock`; a
process that finds the merge done leaves it) into the dataset's `index.json`,
`samples.npy` and finally `fitscale.json`, which marks the dataset complete. Every shard's
xxh64 is recorded in the index, and those of the index and `samples.npy` in `fitscale.json`
(checked by fitscale/data/integrity.py).

Per-sample problems are counted skips, logged with the source name in `skipped.jsonl`:
fewer than `min_image_tokens` tokens (as in the release), more than `max_image_tokens`, a token
width other than p*p*C, NaN or inf values, and inputs a writer cannot read. A label outside
[0, num_classes) is an error: it means the class list or `--num-classes` is wrong for the
whole dataset, not that one sample is bad.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fitscale.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_FILE,
    LATENT_CHANNELS,
    MDS_COLUMNS,
    META_FILE,
    PATCH_SIZE,
    SAMPLE_COLUMNS,
    SAMPLES_FILE,
    LatentSample,
    atomic_save_npy,
    atomic_write_text,
)
from fitscale.data.integrity import HASH, side_file_hashes
from fitscale.diskspace import named_out_of_space
from fitscale.errors import UserError
from fitscale.locking import wait_lock

WRITER_FILE = "writer.json"
PARTS_DIR = "parts"
MERGE_LOCK = ".merge.lock"  # in parts/: the merge of a split write, one process at a time
SKIPPED_FILE = "skipped.jsonl"


class SkipSample(Exception):
    """Raised by a sample builder for an input that is counted and skipped, not fatal."""

    def __init__(self, reason: str, source: str, detail: str = ""):
        super().__init__(f"{source}: {reason}{': ' + detail if detail else ''}")
        self.reason = reason
        self.source = source
        self.detail = detail

    def __reduce__(self):
        return SkipSample, (self.reason, self.source, self.detail)  # crosses from decode workers


@dataclass
class WriteSettings:
    """What defines the content of a dataset; a resumed write must use the same settings."""

    writer: str
    max_image_tokens: int = 256
    min_image_tokens: int = 16
    num_classes: int = 1000
    part_size: int = 4096
    shard_size_limit: int = 1 << 26
    compression: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    latent_channels: int = LATENT_CHANNELS  # C of the autoencoder's latents
    patch_size: int = PATCH_SIZE  # p: a token holds p x p latent pixels

    @property
    def token_dim(self) -> int:
        """Values per token: p * p * C."""
        return self.patch_size * self.patch_size * self.latent_channels

    def as_dict(self) -> dict[str, Any]:
        """The settings as recorded in writer.json (compared when a write resumes); the latent shape
        only when it is not the SD default, so unfinished writes of earlier versions still resume."""
        shape = {}
        if (self.latent_channels, self.patch_size) != (LATENT_CHANNELS, PATCH_SIZE):
            shape = {"latent_channels": self.latent_channels, "patch_size": self.patch_size}
        return {
            **shape,
            "writer": self.writer,
            "max_image_tokens": self.max_image_tokens,
            "min_image_tokens": self.min_image_tokens,
            "num_classes": self.num_classes,
            "part_size": self.part_size,
            "shard_size_limit": self.shard_size_limit,
            "compression": self.compression,
            "options": self.options,
        }


# A builder turns one part's inputs into samples (or SkipSample errors, yielded in their place).
PartBuilder = Callable[[Sequence[Any], int], Iterator["LatentSample | SkipSample"]]


def check_sample(sample: LatentSample, settings: WriteSettings) -> None:
    """Raise SkipSample (or ValueError for a bad label) for a sample that must not be written."""
    source = sample.source
    variants = [("tokens", sample.tokens, sample.rows, sample.cols)]
    if sample.crop is not None:
        variants.append(("crop", sample.crop, sample.crop_rows, sample.crop_cols))
    for name, tokens, rows, cols in variants:
        if tokens.ndim != 3 or tokens.shape[2] != settings.token_dim:
            raise SkipSample(
                "bad token width",
                source,
                f"{name} has shape {tuple(tokens.shape)}, expected (V, rows*cols, {settings.token_dim}) "
                f"(p*p*C = {settings.patch_size}*{settings.patch_size}*{settings.latent_channels})",
            )
        if tokens.shape[1] != rows * cols:
            raise SkipSample("bad grid", source, f"{name} has {tokens.shape[1]} tokens, grid {rows}x{cols}")
        if rows * cols > settings.max_image_tokens:
            raise SkipSample(
                "over token limit", source, f"{name} {rows}x{cols} > {settings.max_image_tokens} tokens"
            )
        if not np.isfinite(tokens).all():
            raise SkipSample("non-finite latents", source, f"{name} holds NaN or inf")
    if sample.rows * sample.cols < settings.min_image_tokens:
        raise SkipSample(
            "under token minimum", source, f"{sample.rows * sample.cols} < {settings.min_image_tokens} tokens"
        )
    if not 0 <= sample.label < settings.num_classes:
        raise UserError(
            f"{source}: label {sample.label} is outside [0, {settings.num_classes}); "
            "fix the class list or pass the right --num-classes"
        )


def prepare_output(out: Path, settings: WriteSettings, overwrite: bool) -> None:
    """Create or reopen `out`; refuse to overwrite a dataset or an unrelated folder."""
    wanted = settings.as_dict()
    if out.exists() and any(out.iterdir()):
        ours = (out / WRITER_FILE).exists() or (out / META_FILE).exists()
        if not ours:
            raise FileExistsError(f"{out} exists and is not a fitscale dataset; choose a new or empty folder")
        if overwrite:
            shutil.rmtree(out)
        elif (out / META_FILE).exists():
            raise FileExistsError(f"{out} already holds a complete dataset; pass --overwrite to replace it")
        else:
            started = json.loads((out / WRITER_FILE).read_text())
            if started != wanted:
                changed = sorted(k for k in wanted if started.get(k) != wanted[k])
                raise UserError(
                    f"{out} holds an unfinished write with other settings ({', '.join(changed)} differ); "
                    "rerun with the same arguments to resume, or pass --overwrite to start over"
                )
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    if not (out / WRITER_FILE).exists():
        atomic_write_text(out / WRITER_FILE, json.dumps(wanted, indent=1))


def part_name(index: int) -> str:
    """Folder name of part `index` (part-00000, ...)."""
    return f"part-{index:05d}"


def write_part(
    out: Path, index: int, inputs: Sequence[Any], build: PartBuilder, settings: WriteSettings, progress
) -> None:
    """Write part `index` of a dataset: the samples `build` makes from `inputs` into MDS shards, its
    sample table and its skip list, in a temporary folder renamed into place when complete (a part is
    either whole or absent, so an interrupted write resumes part by part).
    """
    final = out / PARTS_DIR / part_name(index)
    tmp = out / PARTS_DIR / (part_name(index) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_part_files(tmp, inputs, index, build, settings, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # unfinished: its space back at once (resumes from here)
        raise
    os.replace(tmp, final)


def _write_part_files(
    tmp: Path, inputs: Sequence[Any], index: int, build: PartBuilder, settings: WriteSettings, progress
) -> None:
    """The MDS shards, sample table and skip list of part `index`, into the folder `tmp`."""
    from streaming import MDSWriter

    rows: list[list[int]] = []
    skipped: list[dict[str, str]] = []
    with MDSWriter(
        out=str(tmp),
        columns=MDS_COLUMNS,
        compression=settings.compression,
        size_limit=settings.shard_size_limit,
        hashes=[HASH],
        progress_bar=False,
    ) as mds:
        for item in build(inputs, index * settings.part_size):
            try:
                if isinstance(item, SkipSample):
                    raise item
                check_sample(item, settings)
            except SkipSample as skip:
                skipped.append({"reason": skip.reason, "source": skip.source, "detail": skip.detail})
            else:
                mds.write(item.to_mds())
                rows.append(item.table_row())
            progress.update(1)
    if not rows:  # MDSWriter leaves no index for an empty part
        (tmp / INDEX_FILE).write_text(json.dumps({"version": 2, "shards": []}))
    table = np.asarray(rows, dtype=np.int64).reshape(-1, len(SAMPLE_COLUMNS))
    np.save(tmp / SAMPLES_FILE, table)
    (tmp / SKIPPED_FILE).write_text("".join(json.dumps(s) + "\n" for s in skipped))


def first_tokens_dtype(out: Path, shard: dict[str, Any]) -> str:
    """The latent dtype of a shard's first sample, read from its raw form (for a compressed
    shard decoded in memory: MDSWriter keeps only the compressed file)."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    raw = out / shard["raw_data"]["basename"]
    if raw.exists():
        return str(reader_from_json(str(out), None, shard).get_item(0)["tokens"].dtype)
    data = decompress(shard["compression"], (out / shard["zip_data"]["basename"]).read_bytes())
    reader = reader_from_json(str(out), None, shard)
    first, end = np.frombuffer(data, np.uint32, count=2, offset=4)
    return str(reader.decode_sample(data[first:end])["tokens"].dtype)


def merge_parts(out: Path, num_parts: int, settings: WriteSettings, extra_meta: dict[str, Any]) -> dict:
    """Join complete parts into one dataset; written last, `fitscale.json` marks completion."""
    shards, tables, skipped = [], [], Counter()
    skipped_names: list[dict[str, str]] = []
    dtype = None
    for index in range(num_parts):
        part = out / PARTS_DIR / part_name(index)
        part_index = json.loads((part / INDEX_FILE).read_text())
        for shard in part_index["shards"]:
            for key in ("raw_data", "zip_data"):
                if shard.get(key):
                    shard[key]["basename"] = f"{PARTS_DIR}/{part_name(index)}/{shard[key]['basename']}"
            shards.append(shard)
        tables.append(np.load(part / SAMPLES_FILE))
        for line in (part / SKIPPED_FILE).read_text().splitlines():
            entry = json.loads(line)
            skipped[entry["reason"]] += 1
            skipped_names.append(entry)
    table = np.concatenate(tables) if tables else np.zeros((0, len(SAMPLE_COLUMNS)), np.int64)
    if dtype is None and shards:
        dtype = first_tokens_dtype(out, shards[0])
    atomic_write_text(out / INDEX_FILE, json.dumps({"version": 2, "shards": shards}))
    atomic_save_npy(out / SAMPLES_FILE, table)
    (out / SKIPPED_FILE).write_text("".join(json.dumps(s) + "\n" for s in skipped_names))
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "writer": settings.writer,
        "patch_size": settings.patch_size,
        "latent_channels": settings.latent_channels,
        "token_dim": settings.token_dim,
        "dtype": dtype,
        "max_image_tokens": settings.max_image_tokens,
        "min_image_tokens": settings.min_image_tokens,
        "num_classes": settings.num_classes,
        "num_samples": int(table.shape[0]),
        "num_skipped": int(sum(skipped.values())),
        "skipped": dict(skipped),
        **extra_meta,
    }
    meta["hashes"] = side_file_hashes(out)  # the shards' hashes are in the index (MDSWriter's)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=1))
    return meta


def write_dataset(
    out: str | os.PathLike,
    inputs: Sequence[Any],
    build: PartBuilder,
    settings: WriteSettings,
    *,
    overwrite: bool = False,
    rank: int = 0,
    world_size: int = 1,
    extra_meta: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict | None:
    """Write (or resume writing) a dataset; returns its metadata, or None while other ranks work.

    `build(part_inputs, first_input_index)` yields one LatentSample or SkipSample per input.
    """
    from tqdm import tqdm

    if not 0 <= rank < world_size:
        raise UserError(f"--rank {rank} must lie in [0, --world-size {world_size})")
    out = Path(out)
    prepare_output(out, settings, overwrite)
    num_parts = max(1, -(-len(inputs) // settings.part_size))
    mine = [k for k in range(num_parts) if k % world_size == rank]
    todo = [k for k in mine if not (out / PARTS_DIR / part_name(k)).exists()]
    total = sum(len(inputs[k * settings.part_size : (k + 1) * settings.part_size]) for k in todo)
    done = num_parts - len(todo)
    fix = (
        "free space there or write the dataset to another folder; rerun the same command to resume "
        f"after the complete parts ({done} of {num_parts} were complete when this write began)"
    )
    with named_out_of_space(out, "the dataset", fix):  # a full disk or quota: one line, not a traceback
        with tqdm(
            total=total, desc=f"{settings.writer} -> {out.name}", unit="img", disable=not progress
        ) as bar:
            for k in todo:
                part_inputs = inputs[k * settings.part_size : (k + 1) * settings.part_size]
                write_part(out, k, part_inputs, build, settings, bar)
        if all((out / PARTS_DIR / part_name(k)).exists() for k in range(num_parts)):
            # Ranks that finish together both see every part: the first through the lock merges,
            # the others find the dataset complete and leave it (and its side files) alone.
            fd = wait_lock(out / PARTS_DIR / MERGE_LOCK)
            try:
                if (out / META_FILE).exists():
                    return None
                return merge_parts(out, num_parts, settings, extra_meta or {})
            finally:
                os.close(fd)
    return None
