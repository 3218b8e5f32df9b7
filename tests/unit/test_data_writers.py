"""Writers, stats and bad input, through the real CLI and real MDS shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fitscale.cli import main
from fitscale.config.data import DataConfig


def cli(*args: str) -> int:
    return main([str(a) for a in args])


def test_synth_stats_reports_99_percent_packing_next_to_padding(tmp_path, capsys):
    out = tmp_path / "synth"
    assert (
        cli(
            "data",
            "synth",
            out,
            "--num-images",
            600,
            "--max-tokens",
            1024,
            "--part-size",
            200,
            "--no-progress",
        )
        == 0
    )
    capsys.readouterr()
    assert cli("data", "stats", out, "--json", "--verify") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["images"] == 600 and stats["problems"] == []
    assert stats["token_histogram"][1]["images"] > 0 and stats["token_histogram"][-1]["images"] > 0
    assert stats["packing_efficiency"] >= 0.99
    assert stats["padded_efficiency"] < 0.8
    assert cli("data", "synth", out, "--num-images", 600, "--max-tokens", 1024) == 2
    assert "already holds a complete dataset; pass --overwrite" in capsys.readouterr().err


def test_interrupted_write_resumes_to_the_same_dataset(tmp_path):
    from fitscale.data.sources import build_synth
    from fitscale.data.writer import WriteSettings, write_dataset

    settings = WriteSettings(writer="synth", num_classes=10, part_size=10)
    build = build_synth(1, 256, 10, "float16")

    def failing(inputs, first):
        for k, sample in enumerate(build(inputs, first)):
            if first + k == 25:
                raise RuntimeError("disk full")
            yield sample

    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(tmp_path / "a", range(40), failing, settings, progress=False)
    done = sorted(p.name for p in (tmp_path / "a" / "parts").iterdir())
    assert done == ["part-00000", "part-00001"]  # the unfinished part is removed at once (its space freed)
    written = (tmp_path / "a" / "parts" / "part-00000" / "samples.npy").read_bytes()
    write_dataset(tmp_path / "a", range(40), build, settings, progress=False)
    assert (tmp_path / "a" / "parts" / "part-00000" / "samples.npy").read_bytes() == written
    write_dataset(tmp_path / "b", range(40), build, settings, progress=False)
    assert np.array_equal(np.load(tmp_path / "a" / "samples.npy"), np.load(tmp_path / "b" / "samples.npy"))
    with pytest.raises(ValueError, match="unfinished write with other settings"):
        (tmp_path / "a" / "fitscale.json").unlink()
        write_dataset(
            tmp_path / "a", range(40), build, WriteSettings(writer="synth", num_classes=10, part_size=20)
        )


def test_bad_samples_are_counted_skips_and_bad_labels_errors(tmp_path):
    from fitscale.data.format import LatentSample
    from fitscale.data.writer import WriteSettings, write_dataset

    def build(inputs, first):
        good = np.zeros((1, 16, 16), np.float32)
        yield LatentSample(good, 4, 4, 1, 0, "ok")
        yield LatentSample(np.full((1, 16, 16), np.nan, np.float32), 4, 4, 1, 1, "nan.safetensors")
        yield LatentSample(np.zeros((1, 16, 12), np.float32), 4, 4, 1, 2, "narrow.safetensors")
        yield LatentSample(np.zeros((1, 12, 16), np.float32), 3, 4, 1, 3, "small.safetensors")
        yield LatentSample(np.zeros((1, 289, 16), np.float32), 17, 17, 1, 4, "big.safetensors")

    meta = write_dataset(
        tmp_path / "d", range(5), build, WriteSettings(writer="t", num_classes=10), progress=False
    )
    assert meta["num_samples"] == 1
    assert meta["skipped"] == {
        "non-finite latents": 1,
        "bad token width": 1,
        "under token minimum": 1,
        "over token limit": 1,
    }
    skipped = (tmp_path / "d" / "skipped.jsonl").read_text()
    assert "nan.safetensors" in skipped and "narrow.safetensors" in skipped

    def bad_label(inputs, first):
        yield LatentSample(np.zeros((1, 16, 16), np.float32), 4, 4, 12, 0, "cat/x.png")

    with pytest.raises(ValueError, match=r"cat/x.png: label 12 is outside \[0, 10\)"):
        write_dataset(
            tmp_path / "e", range(1), bad_label, WriteSettings(writer="t", num_classes=10), progress=False
        )


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "d"
    assert cli("data", "digits", out, "--variants", 1, "--part-size", 600, "--no-progress") == 0
    return out


def test_digits_loader_in_both_modes_and_errors_for_corrupt_datasets(digits, tmp_path, capsys):
    from fitscale.data import build_loader

    cfg = DataConfig(path=str(digits), num_classes=10, global_batch_size=32, token_budget=1024, num_workers=0)
    step = next(iter(build_loader(cfg, 0, 1)))
    assert step.global_num_images == 32 and sum(mb.num_images for mb in step.micro_batches) == 32
    assert all(
        mb.num_tokens <= 1024 and set(mb.labels[: mb.num_images].tolist()) <= set(range(10))
        for mb in step.micro_batches
    )
    tokens_cfg = DataConfig(
        path=str(digits),
        num_classes=10,
        batch_mode="tokens",
        token_budget=1024,
        pad_to_budget=True,
        num_workers=0,
    )
    step = next(iter(build_loader(tokens_cfg, 0, 1)))
    assert step.global_num_images is None and step.micro_batches[0].num_tokens == 1024

    with pytest.raises(ValueError, match=r"has label \d outside \[0, 5\)"):
        build_loader(DataConfig(path=str(digits), num_classes=5, num_workers=0), 0, 1)

    broken = tmp_path / "broken"
    shutil.copytree(digits, broken)
    shard = sorted((broken / "parts").rglob("shard.*.mds"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ValueError, match=rf"shard {shard} is truncated or corrupt: 1000 bytes"):
        build_loader(DataConfig(path=str(broken), num_classes=10, num_workers=0), 0, 1)
    (broken / "index.json").unlink()
    assert cli("data", "stats", broken) == 2
    assert f"{broken / 'index.json'}: missing MDS index" in capsys.readouterr().err


def test_from_fit_latents_converts_the_release_layout(tmp_path):
    from safetensors.numpy import save_file

    root = tmp_path / "release"
    rng = np.random.default_rng(0)

    def put(folder, name, rows, cols, width=16, label=3):
        (root / folder).mkdir(parents=True, exist_ok=True)
        feature = rng.standard_normal((2, rows, cols, width)).astype(np.float32)
        save_file(
            {
                "feature": feature,
                "grid": np.zeros((2, rows * cols), np.int64),
                "size": np.array([rows, cols]),
                "label": np.array(label),
            },
            str(root / folder / name),
        )
        return feature

    put("less_than_16", "a.safetensors", 3, 3)
    normal = put("from_16_to_256", "b.safetensors", 8, 12)
    put("from_16_to_256", "c.safetensors", 8, 8, width=12)
    put("greater_than_256_resize", "d.safetensors", 12, 21)
    crop = put("greater_than_256_crop", "d.safetensors", 16, 16)
    (root / "from_16_to_256" / "e.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "mds"
    assert cli("data", "from-fit-latents", root, out, "--no-progress") == 0
    meta = json.loads((out / "fitscale.json").read_text())
    assert meta["num_samples"] == 2 and meta["max_image_tokens"] == 256
    assert meta["skipped"] == {"under token minimum": 1, "bad token width": 1, "unreadable file": 1}
    from streaming.base.local import LocalDataset

    data = LocalDataset(str(out))
    assert np.array_equal(data[0]["tokens"], normal.reshape(2, 96, 16))
    assert np.array_equal(data[1]["crop"], crop.reshape(2, 256, 16)) and data[1]["crop_rows"] == 16


def test_from_images_encodes_photos_with_a_local_vae(tmp_path):
    import skimage
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    vae.save_pretrained(tmp_path / "vae")
    photos = Path(skimage.data_dir)
    for label, names in {
        "animals": ["chelsea.png", "astronaut.png"],
        "things": ["coffee.png", "rocket.jpg"],
    }.items():
        (tmp_path / "images" / label).mkdir(parents=True)
        for name in names:
            shutil.copy(photos / name, tmp_path / "images" / label / name)
    (tmp_path / "images" / "things" / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "latents"
    args = [
        "data",
        "from-images",
        tmp_path / "images",
        out,
        "--vae",
        tmp_path / "vae",
        "--resolution",
        128,
        "--num-classes",
        2,
        "--no-progress",
        "--world-size",
        2,
    ]
    assert cli(*args, "--rank", 1) == 0 and not (out / "fitscale.json").exists()
    assert cli(*args, "--rank", 0, "--dtype", "float32") == 2  # other settings than the started write
    assert cli(*args, "--rank", 0) == 0
    meta = json.loads((out / "fitscale.json").read_text())
    assert meta["num_samples"] == 4 and meta["skipped"] == {"unreadable image": 1}
    assert meta["classes"] == ["animals", "things"] and meta["max_image_tokens"] == 64
    table = np.load(out / "samples.npy")
    assert (table[:, 0] * table[:, 1] <= 64).all() and (table[:, 2] == 8).all()  # all photos exceed 128 px
    # The pixels of REPA (fitscale.data.pixels), prepared again from the folder: each variant on its grid.
    from fitscale.data.pixels import PixelStore

    assert cli("data", "pixels", out, "--images", tmp_path / "images", "--resolution", 96) == 2
    assert cli("data", "pixels", out, "--images", tmp_path / "images", "--resolution", 128) == 0
    store = PixelStore(out)
    for rows, cols, crop_rows, crop_cols, _, _, source_id in table.tolist():
        full, crop = store.image(source_id, rows, cols), store.image(source_id, crop_rows, crop_cols)
        assert full.shape == (rows * 16, cols * 16, 3) and crop.shape == (128, 128, 3)
        if (rows, cols) != (crop_rows, crop_cols):  # a non-square photo: the crop is its own resize
            assert np.array_equal(crop, store._picture(source_id, 1))
            assert np.array_equal(store.image(source_id, rows, cols, flip=True), full[:, ::-1])


def test_digits_grid_sides_are_chosen_recorded_and_checked(tmp_path, capsys):
    from fitscale.data.format import COLS, ROWS, read_meta, read_sample_table

    out = tmp_path / "small"
    assert cli("data", "digits", out, "--variants", 1, "--min-side", 4, "--max-side", 6, "--no-progress") == 0
    meta = read_meta(out)
    assert meta["grid_sides"] == [4, 6] and meta["num_samples"] == 1797
    table = read_sample_table(out, meta["num_samples"])
    sides = np.concatenate([table[:, ROWS], table[:, COLS]])
    assert sides.min() == 4 and sides.max() == 6
    capsys.readouterr()
    assert cli("data", "digits", tmp_path / "bad", "--min-side", 9, "--max-side", 8) == 2
    assert "--min-side 9 --max-side 8: grid sides in tokens must satisfy" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_ranks_that_finish_together_merge_the_split_write_once(tmp_path):
    """Two ranks of a split write that both find every part complete: the one through the merge lock
    first merges; the other waits, finds the dataset complete and leaves it (and the side files
    the merging rank writes after it, such as pixels) alone."""
    import os
    import threading
    import time

    from fitscale.data.sources import build_synth
    from fitscale.data.writer import MERGE_LOCK, PARTS_DIR, WriteSettings, merge_parts, write_dataset
    from fitscale.locking import wait_lock

    out = tmp_path / "split"
    settings = WriteSettings(writer="synth", num_classes=10, part_size=8)
    build = build_synth(1, 256, 10, "float16")
    assert write_dataset(out, range(32), build, settings, rank=0, world_size=2, progress=False) is None
    held = wait_lock(out / PARTS_DIR / MERGE_LOCK)  # the other rank, about to merge
    results = []
    last = threading.Thread(
        target=lambda: results.append(
            write_dataset(out, range(32), build, settings, rank=1, world_size=2, progress=False)
        )
    )
    last.start()
    deadline = time.monotonic() + 60
    while not all((out / PARTS_DIR / f"part-{k:05d}").exists() for k in range(4)):
        assert time.monotonic() < deadline, "rank 1 did not write its parts"
        time.sleep(0.05)
    time.sleep(0.5)  # rank 1 now waits on the lock (without it, it would merge here)
    assert not (out / "fitscale.json").exists()
    merge_parts(out, 4, settings, {})
    merged = (out / "fitscale.json").read_bytes()
    os.close(held)
    last.join(60)
    assert results == [None]  # it found the merge done
    assert (out / "fitscale.json").read_bytes() == merged
