"""Damaged or mixed-up dataset files are named by `data stats --verify` and by the loader."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fitscale.cli import main
from fitscale.config.data import DataConfig
from fitscale.data.format import LatentSample
from fitscale.data.writer import WriteSettings, write_dataset

SHARD = "parts/part-{:05d}/shard.00000.mds"


def latents(index: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).standard_normal((1, 16, 16)).astype(np.float16)


def build_fixed(seed: int):
    """Every image 4x4 tokens with a same-length name: the shards of equal parts have equal sizes."""

    def build(inputs, first):
        for index in inputs:
            yield LatentSample(latents(index, seed), 4, 4, (index + seed) % 10, index, f"img-{index:03d}")

    return build


def write(folder, seed: int = 0):
    settings = WriteSettings(writer="test", num_classes=10, part_size=8)
    write_dataset(folder, range(16), build_fixed(seed), settings, progress=False)
    return folder


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return write(tmp_path_factory.mktemp("integrity") / "d")


@pytest.fixture
def dataset(clean, tmp_path):
    return shutil.copytree(clean, tmp_path / "d")


def verify(folder, capsys) -> tuple[int, dict]:
    capsys.readouterr()
    code = main(["data", "stats", str(folder), "--json", "--verify"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out else {"error": captured.err})


def first_batch(folder, **overrides):
    from fitscale.data import build_loader

    cfg = DataConfig(path=str(folder), num_classes=10, global_batch_size=16, token_budget=256, num_workers=0)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return next(iter(build_loader(cfg, 0, 1)))


def test_an_intact_dataset_verifies_and_records_every_hash(clean, capsys):
    code, stats = verify(clean, capsys)
    assert code == 0 and stats["problems"] == [] and "note" not in stats
    meta = json.loads((clean / "fitscale.json").read_text())
    assert set(meta["hashes"]) == {"index.json", "samples.npy"}
    index = json.loads((clean / "index.json").read_text())
    assert all("xxh64" in shard["raw_data"]["hashes"] for shard in index["shards"])


def test_one_bit_flipped_mid_shard_is_named_by_verify_and_the_loader(dataset, capsys):
    shard = dataset / SHARD.format(0)
    data = bytearray(shard.read_bytes())
    at = bytes(data).find(latents(4, 0).tobytes()) + 101  # sample 4 of 8, inside its token values
    data[at] ^= 1  # the lowest bit of a float16 byte: the value changes and stays finite
    shard.write_bytes(bytes(data))
    code, stats = verify(dataset, capsys)
    assert code == 1 and len(stats["problems"]) == 1, stats
    problem = stats["problems"][0]
    assert problem.startswith(f"shard {shard}: xxh64 ") and problem.endswith("(samples 0-7)")
    assert "its bytes changed after it was written" in problem
    with pytest.raises(
        ValueError, match=rf"^shard {shard}: xxh64 .* \(samples 0-7; data.verify_shards=true\)$"
    ):
        first_batch(dataset)
    assert first_batch(dataset, verify_shards=False).global_num_images == 16  # the check is what saw it


def test_two_same_size_shards_swapped(dataset, capsys):
    first, second = dataset / SHARD.format(0), dataset / SHARD.format(1)
    assert first.stat().st_size == second.stat().st_size  # the size check alone passes
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    code, stats = verify(dataset, capsys)
    assert code == 1
    hashes = [p for p in stats["problems"] if "xxh64" in p]
    assert [p.split(":")[0] for p in hashes] == [f"shard {first}", f"shard {second}"]
    assert "sample 0 in shard parts/part-00000/shard.00000.mds (img-008): samples.npy disagrees" in "".join(
        stats["problems"]
    )
    with pytest.raises(ValueError, match=rf"^shard {first}: xxh64"):
        first_batch(dataset)


def test_side_files_from_another_dataset(dataset, tmp_path, capsys):
    other = write(tmp_path / "other", seed=3)  # same shapes and count, other labels and latents
    shutil.copy(other / "samples.npy", dataset / "samples.npy")
    message = rf"^{dataset / 'samples.npy'} does not belong to this dataset: its xxh64 is \w+, fitscale.json records"
    with pytest.raises(ValueError, match=message):
        first_batch(dataset)
    code, stats = verify(dataset, capsys)
    assert code == 2 and f"{dataset / 'samples.npy'} does not belong to this dataset" in stats["error"]
    shutil.copy(other / "index.json", dataset / "index.json")
    shutil.copy(other / "samples.npy", dataset / "samples.npy")
    with pytest.raises(ValueError, match=rf"^{dataset / 'index.json'} does not belong to this dataset"):
        first_batch(dataset)


def test_a_dataset_without_recorded_hashes_stays_readable_and_says_so(dataset, tmp_path, capsys):
    meta = json.loads((dataset / "fitscale.json").read_text())
    del meta["hashes"]
    (dataset / "fitscale.json").write_text(json.dumps(meta))
    index = json.loads((dataset / "index.json").read_text())
    for shard in index["shards"]:
        shard["raw_data"]["hashes"] = {}
    (dataset / "index.json").write_text(json.dumps(index))
    code, stats = verify(dataset, capsys)
    assert code == 0 and stats["problems"] == []
    assert stats["note"] == (
        "no hashes recorded for 2 of 2 shards, index.json and samples.npy: damage there cannot be "
        "detected; rewrite the dataset with this version to record them"
    )
    assert first_batch(dataset).global_num_images == 16
    # Without hashes, verify still cross-checks samples.npy against the shards, sample by sample.
    other = write(tmp_path / "other", seed=3)
    shutil.copy(other / "samples.npy", dataset / "samples.npy")
    code, stats = verify(dataset, capsys)
    assert code == 1 and len(stats["problems"]) == 16
    assert stats["problems"][0] == (
        "sample 0 in shard parts/part-00000/shard.00000.mds (img-000): samples.npy disagrees with the "
        "shard (label 3 vs 0): the table belongs to another dataset or another order"
    )
