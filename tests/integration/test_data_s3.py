"""Training data from a real S3 server (moto's, over HTTP on localhost, started here).

A dataset is uploaded with `fitscale data upload`, then read through `data.remote=s3://...` into a
cold local cache on 2 ranks (real gloo, real worker processes). Kill-and-resume and a server
restart mid-epoch (shards evicted under a cache limit and fetched again through the outage) both
give the batches of an uninterrupted run, byte for byte.
Wrong credentials, a missing bucket, an unreachable endpoint are refused in one line before any
rank starts, and a shard changed in the bucket is named when it is read. The endpoint and the
secret come from the environment and never reach the run folder.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_data_resume
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.s3_server import S3Server

from fitscale.cli import main
from fitscale.config.data import DataConfig
from fitscale.runtime.env import leave_process_group
from fitscale.runtime.local import free_port, rank_environments

pytestmark = pytest.mark.slow

REMOTE = "s3://latents/synth/v1"
WIDE_REMOTE = "s3://latents/wide/v1"
WIDE_IMAGES = 384  # 24 steps an epoch of 16 images, 101 shards
CACHE_LIMIT = "300kb"  # 4 of the dataset's 64 KiB shards (Streaming's least: 4x the largest)
dataset = test_data_resume.dataset  # the same 96-image synth dataset (a fixture giving its path)


@pytest.fixture
def server(dataset, monkeypatch, capsys):
    """A fresh server holding the uploaded dataset; its endpoint and keys in this process's env."""
    s3 = S3Server()
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    assert main(["data", "upload", str(dataset), REMOTE, "--no-progress"]) == 0
    assert f"train with data.remote={REMOTE}" in capsys.readouterr().out
    yield s3
    s3.stop()


def loader_config(cache: Path, **changes) -> DataConfig:
    values = dict(
        path=str(cache),
        remote=REMOTE,
        global_batch_size=16,
        token_budget=512,
        num_workers=2,
        num_classes=10,
        packing_lookahead=32,
    )
    return DataConfig(**{**values, **changes})


def rank_main(rank, world_size, port, cfg, steps, state_in, out_file, wait_for, kill_after, pause_at=0):
    os.environ.update(rank_environments(world_size, 1, 0, "127.0.0.1", port)[rank])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    from fitscale.data import build_loader

    loader = build_loader(cfg, rank, world_size)  # the metadata is fetched, no shard yet
    if state_in is not None:
        loader.load_state_dict(torch.load(state_in))
    record = []
    for step, batch in enumerate(loader):
        if wait_for is not None and step == pause_at:  # the test stops the server after `pause_at` steps
            Path(f"{out_file}.ready").touch()
            while not Path(wait_for).exists():
                time.sleep(0.05)
        record.append(
            hashlib.sha256(
                b"".join(mb.tokens.numpy().tobytes() + mb.pos.numpy().tobytes() for mb in batch.micro_batches)
            ).hexdigest()
        )
        if step + 1 == steps:
            break
    torch.save({"record": record, "state": loader.state_dict()}, out_file)
    dist.barrier()  # every rank has saved
    if kill_after:  # killed mid-epoch, after its state was saved as a checkpoint would save it
        os.kill(os.getpid(), signal.SIGKILL)
    leave_process_group()


def _entry(rank, world_size, port, cfg, steps, state_in, files, wait_for, kill_after, pause_at):
    rank_main(rank, world_size, port, cfg, steps, state_in, files[rank], wait_for, kill_after, pause_at)


def start(tmp_path, name, cfg, steps, state_in=None, wait_for=None, kill_after=False, pause_at=0):
    files = [str(tmp_path / f"{name}-rank{r}.pt") for r in range(2)]
    context = mp.start_processes(
        _entry,
        args=(2, free_port(), cfg, steps, state_in, files, wait_for, kill_after, pause_at),
        nprocs=2,
        start_method="fork",
        join=False,
    )
    return context, files


def finish(context, files, killed=False) -> list[dict]:
    if killed:
        with pytest.raises(mp.ProcessExitedException):
            while not context.join():
                pass
    else:
        while not context.join():
            pass
    return [torch.load(f) for f in files]


def run(tmp_path, name, cfg, steps, **options) -> list[dict]:
    context, files = start(tmp_path, name, cfg, steps, **options)
    return finish(context, files, killed=options.get("kill_after", False))


@pytest.fixture(scope="module")
def straight(dataset, tmp_path_factory):
    """8 steps (past the first epoch's 6) on 2 ranks, uninterrupted, from a cold cache."""
    from helpers.s3_server import restore_env, set_env

    s3 = S3Server()
    saved = set_env(s3.env())
    try:
        assert main(["data", "upload", str(dataset), REMOTE, "--no-progress"]) == 0
        root = tmp_path_factory.mktemp("straight")
        return run(root, "straight", loader_config(root / "cache"), steps=8)
    finally:
        restore_env(saved)
        s3.stop()


def test_kill_mid_epoch_and_resume_from_a_cold_cache_is_bit_identical(straight, server, tmp_path):
    cache = tmp_path / "cache-b"
    first = run(tmp_path, "first", loader_config(cache), steps=3, kill_after=True)
    assert first[0]["state"]["cursor"] > 0 and first[0]["state"]["epoch"] == 0  # mid-epoch
    state_file = tmp_path / "state.pt"
    torch.save(first[0]["state"], state_file)
    resumed = run(tmp_path, "resumed", loader_config(cache), steps=5, state_in=str(state_file))
    for rank in range(2):
        assert first[rank]["record"] + resumed[rank]["record"] == straight[rank]["record"]
    assert any(cache.rglob("shard.*.mds")), "the shards came through the cache"


@pytest.fixture(scope="module")
def wide_dataset(tmp_path_factory) -> str:
    """A synth dataset like `dataset` with WIDE_IMAGES images."""
    from fitscale.data.sources import build_synth
    from fitscale.data.writer import WriteSettings, write_dataset

    out = tmp_path_factory.mktemp("wide") / "synth"
    settings = WriteSettings(
        writer="synth", max_image_tokens=256, num_classes=10, part_size=128, shard_size_limit=1 << 16
    )
    write_dataset(out, range(WIDE_IMAGES), build_synth(0, 256, 10, "float16"), settings, progress=False)
    return str(out)


def test_a_server_restart_mid_epoch_is_ridden_out_bit_identically(server, wide_dataset, tmp_path):
    """The server stops after 2 of an epoch's 24 steps, with a cache limit of 4 of the 101 shards:
    the later steps fetch shards (again, once evicted) through the outage and from the restarted
    server (its request log shows them), and the batches are those of an uninterrupted run."""
    upload = ["data", "upload", wide_dataset, WIDE_REMOTE, "--no-progress"]
    assert main(upload) == 0
    steps = 24

    def config(cache: Path) -> DataConfig:
        # no worker processes: their pipeline reads the whole run ahead while the ranks wait at the
        # pause (docs/reliability.md), so only the inline reader is stopped mid-epoch for certain
        return loader_config(cache, remote=WIDE_REMOTE, cache_limit=CACHE_LIMIT, prefetch=1, num_workers=0)

    straight = run(tmp_path, "straight", config(tmp_path / "cache-a"), steps=steps)
    go, cache = tmp_path / "go", tmp_path / "cache-b"
    context, files = start(tmp_path, "restart", config(cache), steps=steps, wait_for=str(go), pause_at=2)
    while not all(Path(f"{f}.ready").exists() for f in files):
        context.join(timeout=0.05)  # raises a rank's error rather than waiting for it forever
    server.stop()  # connections are refused from here on
    cached = {str(p.relative_to(cache)) for p in cache.rglob("shard.*.mds")}
    go.touch()
    time.sleep(3.0)  # the ranks' next shard downloads fail and back off meanwhile
    server.start(log=tmp_path / "requests.log")  # same port; moto's buckets are in memory, so the
    server.client().create_bucket(Bucket="latents")  # dataset is uploaded again
    assert main(upload) == 0
    restarted = finish(context, files)
    assert [r["record"] for r in restarted] == [r["record"] for r in straight]
    shards = {str(p.relative_to(wide_dataset)) for p in Path(wide_dataset).rglob("shard.*.mds")}
    assert 0 < len(cached) < len(shards) // 4, f"{len(cached)} of {len(shards)} shards cached at the outage"
    requests = (tmp_path / "requests.log").read_text().splitlines()
    fetched = [line for line in requests if '"GET /latents/wide/v1/' in line and ".mds" in line]
    assert fetched, "no shard was downloaded after the restart: the outage was not mid-epoch"


def test_a_shard_changed_in_the_bucket_is_named_when_read(server, dataset, tmp_path):
    from fitscale.data import build_loader
    from fitscale.data.format import read_index, shard_files

    name = shard_files(read_index(dataset))[0][0]
    tampered = bytearray((Path(dataset) / name).read_bytes())
    tampered[-1] ^= 0xFF  # same size, other bytes
    server.client().put_object(Bucket="latents", Key=f"synth/v1/{name}", Body=bytes(tampered))
    loader = build_loader(loader_config(tmp_path / "cache", num_workers=0, shuffle=False), 0, 1)
    with pytest.raises(ValueError) as error:
        next(iter(loader))
    (line,) = str(error.value).splitlines()
    assert name.rsplit("/", 1)[-1] in line and "xxh64" in line


def test_a_server_gone_for_longer_than_the_retries_is_named_in_one_line(server, tmp_path):
    from fitscale.data import build_loader

    cfg = loader_config(tmp_path / "cache", num_workers=0, download_retry=0)
    loader = build_loader(cfg, 0, 1)  # the metadata is here; no shard yet
    server.stop()
    with pytest.raises(ValueError) as error:
        next(iter(loader))
    (line,) = str(error.value).splitlines()
    assert "could not be fetched into" in line and "EndpointConnectionError" in line
    assert "check data.remote, S3_ENDPOINT_URL and the server, or raise data.download_retry" in line


def train_command(tmp_path, remote: str, *extra: str) -> list[str]:
    sets = [
        f"data.path={tmp_path / 'cache'}",
        f"data.remote={remote}",
        f"train.run_dir={tmp_path / 'run'}",
        "data.num_classes=10",
        "data.global_batch_size=8",
        "data.token_budget=1024",
        "data.num_workers=1",
        "train.steps=2",
        "checkpoint.interval=2",
        "checkpoint.async_save=false",
        "hooks.before=[]",
        "hooks.after=[]",
        *extra,
    ]
    return [
        sys.executable,
        "-m",
        "fitscale.cli",
        "train",
        "recipes/demo.yaml",
        "--nproc",
        "2",
        "--set",
        *sets,
    ]


def test_training_on_two_ranks_from_s3_keeps_the_secret_out_of_the_run_folder(server, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        train_command(tmp_path, REMOTE), env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()
    secret = server.secret_key.encode()
    leaked = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert leaked == [] and server.secret_key not in result.stdout + result.stderr


@pytest.fixture(scope="module")
def guarded(dataset):
    """A server that checks credentials (only the key made through its IAM is valid), holding the dataset."""
    from helpers.s3_server import restore_env, set_env

    s3 = S3Server(auth=True)
    saved = set_env(s3.env())
    try:
        assert main(["data", "upload", str(dataset), REMOTE, "--no-progress"]) == 0
    finally:
        restore_env(saved)
    yield s3
    s3.stop()


@pytest.mark.parametrize("case", ["credentials", "bucket", "endpoint", "empty-prefix"])
def test_a_remote_that_cannot_be_read_is_refused_in_one_line_before_any_rank(
    guarded, tmp_path, case, monkeypatch, capsys
):
    for key, value in guarded.env().items():
        monkeypatch.setenv(key, value)
    remote = REMOTE
    if case == "credentials":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        expected = "refused the credentials (403); check AWS_ACCESS_KEY_ID"
    elif case == "bucket":
        remote = "s3://no-such-bucket/synth/v1"
        expected = f"bucket 'no-such-bucket' does not exist at {guarded.endpoint}; create it or fix the URI"
    elif case == "endpoint":
        monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        expected = f"the endpoint {os.environ['S3_ENDPOINT_URL']} cannot be reached"
    else:
        remote = "s3://latents/nothing-here"
        expected = "no index.json there, so no dataset; upload one with `fitscale data upload DATASET"
    capsys.readouterr()
    assert main(train_command(tmp_path, remote)[3:]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert f"data.remote={remote}: " in lines[0] and expected in lines[0], lines[0]
    assert (
        not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "cache").exists()
    )  # no rank started
    assert guarded.secret_key not in lines[0]
