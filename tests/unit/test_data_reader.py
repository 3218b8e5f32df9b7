"""Shard reads of the loader: the same batches as decoding whole samples, from a cache too, and
damaged samples named."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fitscale.config.data import DataConfig
from fitscale.data.batch import PackedBatch, pack_images
from fitscale.data.loader import LatentLoader
from fitscale.data.materialize import SHM_DIR, MaterializeStep, SharedStep, remove_leftovers, shared_prefix

NUM_IMAGES = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fitscale.data.sources import build_synth
    from fitscale.data.writer import WriteSettings, write_dataset

    out = tmp_path_factory.mktemp("reader") / "synth"
    settings = WriteSettings(writer="synth", num_classes=10, part_size=32, shard_size_limit=1 << 16)
    write_dataset(out, range(NUM_IMAGES), build_synth(0, 256, 10, "float16"), settings, progress=False)
    return out


def config(path, **overrides) -> DataConfig:
    settings = dict(path=str(path), global_batch_size=16, token_budget=1024, num_classes=10, num_workers=0)
    settings.update(overrides)
    return DataConfig(**settings)


def reference_batch(decoded, images, pad_to) -> object:
    """`pack_images` of whole decoded samples: what the loader produced before it read shards."""
    tokens, grids, labels, ids = [], [], [], []
    for image in images:
        sample = decoded[image.index]
        key, rows, cols = ("crop", "crop_rows", "crop_cols") if image.crop else ("tokens", "rows", "cols")
        tokens.append(torch.from_numpy(np.array(sample[key][int(image.flip)], dtype=np.float32)))
        grids.append((sample[rows], sample[cols]))
        labels.append(sample["label"])
        ids.append(sample["source_id"])
    return pack_images(tokens, grids, labels, ids, pad_to, 10)


@pytest.mark.parametrize("pad", [False, True])
def test_micro_batches_equal_packing_of_decoded_samples(dataset, pad):
    from streaming.base.local import LocalDataset

    decoded = LocalDataset(str(dataset))
    cfg = config(dataset, pad_to_budget=pad, crop_prob=0.5, flip_prob=0.5)
    loader = LatentLoader(cfg, 0, 1)
    planner = loader._new_planner()
    materialize = MaterializeStep(loader.reader, loader.table, cfg, str(dataset))
    crops = flips = 0
    for _ in range(12):  # two epochs
        for images in planner.next_step(1)[0]:
            got = materialize.micro_batch(np.array([image[1:4] for image in images]))
            want = reference_batch(decoded, images, cfg.token_budget if pad else None)
            for name in ("tokens", "pos", "cu_seqlens", "labels", "sizes", "sample_ids"):
                assert torch.equal(getattr(got, name), getattr(want, name)), name
                assert getattr(got, name).dtype == getattr(want, name).dtype
            assert (got.max_seqlen, got.num_images) == (want.max_seqlen, want.num_images)
            crops += sum(image.crop for image in images)
            flips += sum(image.flip for image in images)
    assert crops and flips


def digests(cfg, steps=6) -> list[bytes]:
    out = []
    for batch in LatentLoader(cfg, 0, 1):
        out.append(
            b"".join(
                mb.tokens.numpy().tobytes() + mb.sample_ids.numpy().tobytes() for mb in batch.micro_batches
            )
        )
        if len(out) == steps:
            return out
    raise AssertionError("the loader ended")


def test_remote_dataset_through_a_small_local_cache_gives_the_same_batches(dataset, tmp_path):
    local = digests(config(dataset))
    cached = config(tmp_path / "cache", remote=str(dataset), cache_limit="300kb")
    assert digests(cached) == local
    assert sum(f.stat().st_size for f in (tmp_path / "cache").rglob("*.mds")) <= 300 * 1024


def test_compressed_dataset_is_written_verified_and_loaded_like_the_raw_one(dataset, tmp_path):
    from fitscale.data.format import read_meta
    from fitscale.data.sources import build_synth
    from fitscale.data.stats import dataset_stats
    from fitscale.data.writer import WriteSettings, write_dataset

    settings = WriteSettings(
        writer="synth", num_classes=10, part_size=32, shard_size_limit=1 << 16, compression="zstd"
    )
    verified, loaded = tmp_path / "verified", tmp_path / "loaded"
    for out in (verified, loaded):
        write_dataset(out, range(NUM_IMAGES), build_synth(0, 256, 10, "float16"), settings, progress=False)
        assert read_meta(out)["dtype"] == "float16"
        assert not list(out.rglob("*.mds"))  # only the compressed shards are stored
    assert dataset_stats(verified, verify=True)["problems"] == []
    assert digests(config(loaded)) == digests(config(dataset))


def test_damaged_sample_bytes_and_nan_latents_are_named(dataset, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    cfg = config(broken, verify_shards=False)  # the per-sample checks behind the shard hashes
    loader = LatentLoader(cfg, 0, 1)
    reader = loader.reader
    shards, locals_ = reader.locate(np.array([3, 5]))
    names = [reader.layouts[int(shard)].basename for shard in shards]
    columns = [reader._column(int(s), int(k), "tokens") for s, k in zip(shards, locals_)]
    for name, (_, _, start, size), damage in zip(names, columns, ("dtype", "nan")):
        data = bytearray((broken / name).read_bytes())
        if damage == "dtype":
            data[start] = 99  # not an ndarray dtype code
        else:  # the last two values of the last variant stored
            data[start + size - 4 : start + size] = np.full(2, np.nan, np.float16).tobytes()
        (broken / name).write_bytes(bytes(data))

    materialize = MaterializeStep(LatentLoader(cfg, 0, 1).reader, loader.table, cfg, str(broken))
    with pytest.raises(
        ValueError, match=rf"sample 3 in shard {names[0]} cannot be read .*dtype code 99.*corrupt"
    ):
        materialize.micro_batch(np.array([[3, 0, 0]]))
    last_variant = int(loader.table[5, 5])  # has_flip: the flipped tokens are stored last
    with pytest.raises(
        ValueError, match=rf"sample 5 \(source 'synth:5', shard {names[1]}\): latents hold NaN"
    ):
        materialize.micro_batch(np.array([[5, 0, last_variant]]))


@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="no /dev/shm")
def test_steps_through_shared_memory_arrive_whole_and_leave_no_files(dataset):
    cfg = config(dataset, num_workers=2, pad_to_budget=True)
    loader = LatentLoader(cfg, 0, 1)
    prefix = shared_prefix(cfg)
    local = MaterializeStep(loader.reader, loader.table, cfg, str(dataset))
    shared = MaterializeStep(loader.reader, loader.table, cfg, str(dataset), prefix)
    work = [np.array([image[1:4] for image in images]) for images in loader._new_planner().next_step(1)[0]]
    work.append(np.zeros((0, 3), np.int64))  # a padding-only micro-batch
    step = shared(work)
    assert isinstance(step, SharedStep) and len(list(SHM_DIR.glob(Path(prefix).name + "-*"))) == 1
    arrived = pickle.loads(pickle.dumps(step))  # as the trainer's process receives it
    assert not list(SHM_DIR.glob(Path(prefix).name + "-*"))
    for got, want in zip(arrived, local(work), strict=True):
        assert type(got) is PackedBatch and got.num_images == want.num_images
        assert all(
            torch.equal(getattr(got, name), getattr(want, name)) for name in ("tokens", "pos", "cu_seqlens")
        )
    shared(work)  # never taken in: the pipeline's close removes it
    remove_leftovers(prefix)
    assert not list(SHM_DIR.glob(Path(prefix).name + "-*"))


def test_tokens_mode_with_a_waiting_packer_resumes_on_another_world_size(dataset):
    """The packer's waiting images are part of the state: 2 ranks stop, 3 ranks continue with
    exactly the micro-batches (images and tokens) the 2-rank run would have made next."""
    cfg = config(
        dataset, batch_mode="tokens", token_budget=512, micro_batches_per_step=2, pad_to_budget=True,
        packing_lookahead=16,
    )  # fmt: skip

    def micro_batches(world_size: int, steps: int, state=None) -> tuple[list, dict]:
        loaders = [LatentLoader(cfg, rank, world_size) for rank in range(world_size)]
        if state is not None:
            for loader in loaders:
                loader.load_state_dict(state)
        per_rank = [[step.micro_batches for _, step in zip(range(steps), loader)] for loader in loaders]
        states = [loader.state_dict() for loader in loaders]
        assert all(s == states[0] for s in states), "the loader state is the same on every rank"
        bins = [
            (mb.sample_ids[: mb.num_images].tolist(), mb.tokens.numpy().tobytes())
            for step in range(steps)
            for rank in range(world_size)
            for mb in per_rank[rank][step]
        ]
        return bins, states[0]

    straight, _ = micro_batches(2, 6)
    first, state = micro_batches(2, 2)
    assert first == straight[:8] and len(state["waiting"]) > 0, "the packer must hold images at the stop"
    resumed, _ = micro_batches(3, 2, state)
    assert resumed == straight[8:20]
