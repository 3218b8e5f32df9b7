"""Readers of one Streaming cache folder: shared within a run, refused between live runs, and
taken over after a run killed with SIGKILL left Streaming's registration behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from fitscale.config.data import DataConfig
from fitscale.data.loader import LatentLoader

HOLD = textwrap.dedent(
    """
    import sys
    from fitscale.config.data import DataConfig
    from fitscale.data.loader import LatentLoader
    cache, remote = sys.argv[1:3]
    loader = LatentLoader(DataConfig(path=cache, remote=remote, num_classes=10, num_workers=0), 0, 1)
    print("ready", flush=True)
    sys.stdin.readline()
    """
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fitscale.data.sources import build_synth
    from fitscale.data.writer import WriteSettings, write_dataset

    out = tmp_path_factory.mktemp("cache") / "synth"
    settings = WriteSettings(writer="synth", num_classes=10, part_size=32, shard_size_limit=1 << 16)
    write_dataset(out, range(32), build_synth(0, 256, 10, "float16"), settings, progress=False)
    return out


def config(**fields) -> DataConfig:
    return DataConfig(num_classes=10, global_batch_size=8, token_budget=1024, num_workers=0, **fields)


def first_ids(loader: LatentLoader) -> list[int]:
    step = next(iter(loader))
    return sorted(i for mb in step.micro_batches for i in mb.sample_ids[: mb.num_images].tolist())


def test_a_remote_validation_split_and_train_and_validation_on_one_cache(dataset, tmp_path):
    from fitscale.train.validation import validation_batches

    # The split is read twice (a probe for its size, then one pass): Streaming refused the second.
    cached = config(path=str(dataset), val_path=str(tmp_path / "val"), val_remote=str(dataset))
    assert sum(b.num_images for b in validation_batches(cached, 0, 1)) == 32
    # Train and validation through one cache of one remote share its reader.
    same = config(
        path=str(tmp_path / "c"), remote=str(dataset), val_path=str(tmp_path / "c"), val_remote=str(dataset)
    )
    train, val = LatentLoader(same, 0, 1), LatentLoader(same, 0, 1, validation=True)
    assert train.reader.cache is val.reader.cache and len(first_ids(train)) == 8 and len(first_ids(val)) == 8
    # One folder asked to cache two remotes is refused by field name.
    other = config(
        path=str(tmp_path / "c"), remote=str(dataset), val_path=str(tmp_path / "c"), val_remote="s3://b/x"
    )
    with pytest.raises(
        ValueError, match="^data.val_path=.*/c is already the cache folder of remote '.*synth' in this run"
    ):
        LatentLoader(other, 0, 1, validation=True)


@pytest.mark.slow  # a second process holding the cache, ~20 s
def test_a_cache_in_use_by_a_live_run_is_refused_and_taken_over_after_sigkill(dataset, tmp_path):
    cache = tmp_path / "cache"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(cache), str(dataset)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: SIGKILL takes Python's resource tracker too
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(ValueError) as refused:
            LatentLoader(config(path=str(cache), remote=str(dataset)), 0, 1)
        assert str(refused.value) == (
            f"data.path={cache}: this cache folder is in use by another run on this machine (pid {holder.pid}); "
            "Streaming allows one reader per cache folder: give this run its own data.path"
        )
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    # Its registration outlived it (as after a job's whole process group is killed) ...
    from fitscale.data.cache import SHM_DIR

    stale = [p for p in SHM_DIR.glob("*_locals") if str(cache).encode() in p.read_bytes()]
    assert stale, "the killed run left no registration: the scenario did not happen"
    # ... and the next run on the folder takes it over instead of Streaming's "Reused local directory".
    assert len(first_ids(LatentLoader(config(path=str(cache), remote=str(dataset)), 0, 1))) == 8


def test_stale_registrations_are_found_past_any_gap_of_free_prefixes(tmp_path, monkeypatch):
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _get_path, _pack_locals

    import fitscale.data.cache as cache_module

    monkeypatch.setattr(cache_module, "SHM_DIR", tmp_path)
    mine, other = "/data/cache-a", "/data/cache-b"
    for prefix, folder in ((3, other), (900, mine)):  # 896 free prefixes between them
        for name in SHM_TO_CLEAN:
            data = _pack_locals([folder], prefix) if name == LOCALS else b"\0"
            (tmp_path / _get_path(prefix, name)).write_bytes(data)
    removed = cache_module.remove_stale_registrations(mine)
    assert sorted(removed) == sorted(_get_path(900, name) for name in SHM_TO_CLEAN)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(_get_path(3, name) for name in SHM_TO_CLEAN)


def test_a_cache_limit_below_four_shards_is_refused_in_one_line(dataset, tmp_path):
    """Streaming needs room for four of the largest shards; less is one line naming the field."""
    small = config(path=str(tmp_path / "c"), remote=str(dataset), cache_limit="1kb")
    with pytest.raises(ValueError) as refused:
        LatentLoader(small, 0, 1)
    message = str(refused.value)
    assert message.startswith("data.cache_limit=1kb: too small for data.path=") and "\n" not in message
    assert message.endswith(
        "raise it to at least four times the largest shard, or unset it to keep every shard"
    )
