"""Token arrays straight from the bytes of MDS shards, without decoding whole samples.

`StreamingDataset.__getitem__` opens the shard file, reads the sample and decodes every one of
its nine columns into a dict: about half of what a worker spent per image. Training
needs only the tokens of one variant; sizes, labels and ids are in the sample table already.
So each worker maps every raw shard once (`mmap`), finds where the `tokens` and `crop` arrays of
all its samples lie in one vectorised pass over their header bytes (`ArrayIndex`), and per
image views the chosen variant's values in place; the packer copies them into the micro-batch.
Nothing else of the sample is touched. A sample whose headers do not check out is decoded on
its own (`variants`) to say what is wrong with it.

The MDS layout read here (streaming 0.x, format version 2): a shard is
`uint32 n | uint32 offsets[n + 1] | config | samples`; a sample is the uint32 sizes of its
variable-size columns, then every column's bytes in column order; an `ndarray` column is
`uint8 dtype code | uint8 (ndim << 2 | shape width) | shape | values`.

Shards come from the dataset folder itself, or, for a remote dataset or compressed shards, from
a `StreamingDataset` that downloads / decompresses them into its local cache on first use
(`prepare_shard`), may evict them under `cache_limit`, and is told of every access so that its
eviction picks the coldest shards.
"""

from __future__ import annotations

import math
import mmap
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fitscale.compat import shard_state, touch_shard
from fitscale.data.format import INDEX_FILE, TOKEN_DIM
from fitscale.data.integrity import shard_hash_problem
from fitscale.errors import UserError

# MDS ndarray dtype codes (streaming.base.format.mds.encodings.NDArray) of the latent dtypes.
VALUE_DTYPES = {18: np.dtype("<f2"), 34: np.dtype("<f4"), 66: np.dtype("<f8")}
SHAPE_FORMATS = "BHIQ"  # shape width 1, 2, 4, 8 bytes
ARRAY_COLUMNS = ("tokens", "crop")
SHARD_LOCAL = 3  # streaming's _ShardState.LOCAL


class ShardReadError(UserError):
    """A sample whose bytes do not decode: the shard is corrupt."""


@dataclass(frozen=True)
class ShardLayout:
    """Where the columns of one shard's samples lie, from its entry in index.json."""

    basename: str
    num_samples: int
    num_variable: int  # uint32 sizes at the start of every sample
    columns: dict[str, tuple[int, int, int]]  # name -> (fixed bytes before, variable columns before, own)

    @classmethod
    def from_index(cls, shard: dict[str, Any], where: str) -> ShardLayout:
        """The column layout of one shard from its `index.json` entry.

        Raises ValueError (prefixed with `where`) when the shard lacks the ndarray `tokens`/`crop` or
        str `source` columns, i.e. is not a fitscale latent dataset.
        """
        names, encodings, sizes = shard["column_names"], shard["column_encodings"], shard["column_sizes"]
        expected = {"tokens": "ndarray", "crop": "ndarray", "source": "str"}
        for name, encoding in expected.items():
            if name not in names or encodings[names.index(name)] != encoding:
                raise UserError(
                    f"{where}: shard {shard['raw_data']['basename']} has no {encoding} column {name!r}; "
                    "not a fitscale latent dataset, rewrite it with `fitscale data ...`"
                )
        columns, fixed, variable = {}, 0, 0
        for name, size in zip(names, sizes):
            if size is None:
                columns[name] = (fixed, variable, variable)
                variable += 1
            else:
                fixed += int(size)
        return cls(shard["raw_data"]["basename"], int(shard["samples"]), variable, columns)


def gather(data: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Bytes of `data` at positions `at` (clipped into the file: bad positions fail checks later)."""
    return data[np.clip(at, 0, data.size - 1)].astype(np.int64)


def little_endian(data: np.ndarray, at: np.ndarray, width: np.ndarray) -> np.ndarray:
    """The unsigned integers of `width` bytes (1, 2, 4 or 8 each) stored at `at`."""
    value = np.zeros(at.shape, np.int64)
    for byte in range(8):
        value |= np.where(byte < width, gather(data, at + byte), 0) << (8 * byte)
    return value


@dataclass
class ArrayIndex:
    """Where the values of one ndarray column lie in every sample of a shard, found at once.

    `values[i]` is -1 where sample i does not hold a well-formed (V, T, token_dim) array; the
    per-sample decoder (`ShardReader.variants`) then says what is wrong with it.
    """

    values: list[int]  # byte offset of the first value
    codes: list[int]  # MDS dtype code
    variants: list[int]  # V
    tokens: list[int]  # T

    @classmethod
    def build(
        cls, data: np.ndarray, offsets: np.ndarray, layout: ShardLayout, name: str, token_dim: int = TOKEN_DIM
    ) -> ArrayIndex:
        """Where the `name` array of every sample of a shard lies in the shard bytes `data` (sample
        boundaries `offsets`), read from MDS's ndarray encoding without decoding samples; samples whose
        header does not describe a (V, L, token_dim) array are marked bad.
        """
        begins, ends = offsets[:-1], offsets[1:]
        count = layout.num_variable
        heads = begins[:, None] + np.arange(4 * count)
        sizes = little_endian(data, heads[:, ::4].ravel(), np.full(heads[:, ::4].size, 4)).reshape(-1, count)
        fixed, before, own = layout.columns[name]
        start = begins + 4 * count + fixed + sizes[:, :before].sum(1)
        size = sizes[:, own]
        code, packed = gather(data, start), gather(data, start + 1)
        width = 1 << (packed & 3)
        shape = [little_endian(data, start + 2 + k * width, width) for k in range(3)]
        itemsize = np.select(
            [code == c for c in VALUE_DTYPES], [d.itemsize for d in VALUE_DTYPES.values()], 0
        )
        values = start + 2 + 3 * width
        good = (
            (begins + 4 * count + sizes.sum(1) <= ends)
            & (size >= 2)
            & (itemsize > 0)
            & (packed >> 2 == 3)
            & (shape[2] == token_dim)
            & (values + shape[0] * shape[1] * token_dim * itemsize == start + size)
        )
        values = np.where(good, values, -1)
        return cls(values.tolist(), code.tolist(), shape[0].tolist(), shape[1].tolist())


class ShardReader:
    """Random access to the stored token arrays of a dataset, by global sample index."""

    def __init__(
        self,
        folder: str | Path,
        index: dict[str, Any],
        cache: Any = None,
        verify: bool = False,
        token_dim: int = TOKEN_DIM,
    ):
        """`verify`: check each shard against its hash in the index when first mapped (ShardReadError).
        `token_dim`: p * p * C of the dataset (its fitscale.json)."""
        self.folder, self.cache, self.verify, self.token_dim = Path(folder), cache, verify, token_dim
        self.raw_entries = [shard["raw_data"] for shard in index["shards"]]
        where = str(self.folder / INDEX_FILE)
        self.layouts = [ShardLayout.from_index(shard, where) for shard in index["shards"]]
        counts = np.array([layout.num_samples for layout in self.layouts], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self._maps: dict[int, tuple[mmap.mmap, np.ndarray, list[int]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"] = {}  # every process maps the shards itself
        return state

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, sample within the shard) of each global sample index."""
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        return shards, indices - self.starts[shards]

    def _open(self, shard: int) -> tuple[mmap.mmap, np.ndarray, list[int], tuple[ArrayIndex, ArrayIndex]]:
        """The shard mapped into memory, with its sample offsets; fetched first when cached."""
        opened = self._maps.get(shard)
        if self.cache is not None:
            if opened is None or shard_state(self.cache, shard) != SHARD_LOCAL:
                try:
                    self.cache.prepare_shard(shard)  # download / decompress; blocks while another does
                except ValueError:
                    raise
                except Exception as error:  # the download failed after every retry
                    reason = (str(error).strip().splitlines() or [""])[0]
                    raise ShardReadError(
                        f"shard {self.layouts[shard].basename} could not be fetched into {self.folder} "
                        f"({type(error).__name__}: {reason}); check data.remote, S3_ENDPOINT_URL and the "
                        "server, or raise data.download_retry"
                    ) from error
                opened = None
            touch_shard(self.cache, shard, time.time_ns())  # what get_item records
        if opened is not None:
            return opened
        layout = self.layouts[shard]
        path = self.folder / layout.basename
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        data = np.frombuffer(mapped, dtype=np.uint8)
        if self.verify:
            problem = shard_hash_problem(path, self.raw_entries[shard], mapped)
            if problem:
                first, last = int(self.starts[shard]), int(self.starts[shard + 1]) - 1
                raise ShardReadError(f"{problem} (samples {first}-{last}; data.verify_shards=true)")
        head = 4 * (layout.num_samples + 2)
        if data.size < head or int(data[:4].view("<u4")[0]) != layout.num_samples:
            raise ShardReadError(
                f"shard {path}: header does not hold the {layout.num_samples} samples of the index"
            )
        offsets = data[4:head].view("<u4").astype(np.int64)
        if offsets[-1] > data.size or np.any(np.diff(offsets) < 0):
            raise ShardReadError(f"shard {path}: sample offsets run past its {data.size} bytes")
        indexes = tuple(
            ArrayIndex.build(data, offsets, layout, name, self.token_dim) for name in ARRAY_COLUMNS
        )
        opened = (mapped, data, offsets.tolist(), indexes)
        self._maps[shard] = opened
        return opened

    def _column(self, shard: int, local: int, name: str) -> tuple[mmap.mmap, np.ndarray, int, int]:
        """(mapping, bytes, start, size) of one column of one sample."""
        mapped, data, offsets, _ = self._open(shard)
        layout = self.layouts[shard]
        begin, end = offsets[local], offsets[local + 1]
        sizes = struct.unpack_from(f"<{layout.num_variable}I", mapped, begin)
        fixed, before, own = layout.columns[name]
        start = begin + 4 * layout.num_variable + fixed + sum(sizes[:before])
        size = sizes[own]
        if start + size > end or begin + 4 * layout.num_variable + sum(sizes) > end:
            raise ShardReadError(f"column sizes {sizes} overrun the sample's {end - begin} bytes")
        return mapped, data, start, size

    def variant(self, shard: int, local: int, crop: bool, flip: bool, length: int) -> np.ndarray | None:
        """The (length, token_dim) values of one stored variant, viewed in place; None when the
        sample holds no such variant (ask `variants` why). The loader's per-image hot path."""
        _, data, _, indexes = self._open(shard)
        index = indexes[crop]
        start = index.values[local]
        if start < 0 or index.tokens[local] != length or index.variants[local] <= flip:
            return None
        dtype = VALUE_DTYPES[index.codes[local]]
        nbytes = length * self.token_dim * dtype.itemsize
        start += flip * nbytes
        return data[start : start + nbytes].view(dtype).reshape(length, self.token_dim)

    def variants(self, shard: int, local: int, crop: bool) -> np.ndarray:
        """The stored (V, tokens, width) array of the resized (or crop) image, viewed in place."""
        mapped, data, start, size = self._column(shard, local, ARRAY_COLUMNS[int(crop)])
        if size < 2:
            raise ShardReadError(f"ndarray column of {size} bytes")
        code, packed = mapped[start], mapped[start + 1]
        dtype = VALUE_DTYPES.get(code)
        if dtype is None:
            raise ShardReadError(f"latent dtype code {code} (float16/32/64 expected)")
        ndim, width = packed >> 2, 1 << (packed & 3)
        shape = struct.unpack_from(f"<{ndim}{SHAPE_FORMATS[packed & 3]}", mapped, start + 2)
        values = start + 2 + ndim * width
        count = math.prod(shape)
        if values + count * dtype.itemsize != start + size:
            raise ShardReadError(f"array of shape {shape} does not fill its {size} bytes")
        return data[values : values + count * dtype.itemsize].view(dtype).reshape(shape)

    def source(self, shard: int, local: int) -> str:
        """The stored source name (for error messages)."""
        mapped, _, start, size = self._column(shard, local, "source")
        return bytes(mapped[start : start + size]).decode("utf-8", errors="replace")
