"""Loader resume across processes: real MDS shards, real gloo, worker processes.

Same world size -> bit-identical continuation; 2 -> 1 and 2 -> 3 ranks -> the epoch goes on
with no image seen twice and none skipped.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fitscale.config.data import DataConfig
from fitscale.runtime.env import leave_process_group
from fitscale.runtime.local import free_port, rank_environments

pytestmark = pytest.mark.slow

NUM_IMAGES = 96


def rank_main(rank, world_size, port, cfg, steps, state_in, out_file):
    os.environ.update(rank_environments(world_size, 1, 0, "127.0.0.1", port)[rank])
    dist.init_process_group("gloo", rank=rank, world_size=world_size)  # a group even for one rank
    from fitscale.data import build_loader

    loader = build_loader(cfg, rank, world_size)
    if state_in is not None:
        loader.load_state_dict(torch.load(state_in))
    record = []
    for step, batch in enumerate(loader):
        record.append(
            {
                "ids": [i for mb in batch.micro_batches for i in mb.sample_ids[: mb.num_images].tolist()],
                "digest": hashlib.sha256(
                    b"".join(
                        mb.tokens.numpy().tobytes() + mb.pos.numpy().tobytes() for mb in batch.micro_batches
                    )
                ).hexdigest(),
                "global_num_images": batch.global_num_images,
            }
        )
        if step + 1 == steps:
            break
    state = loader.state_dict()
    torch.save({"record": record, "state": state, "epoch": loader.epoch}, out_file)
    dist.barrier()
    leave_process_group()


def run(tmp_path, name, world_size, cfg, steps, state_in=None):
    files = [tmp_path / f"{name}-rank{r}.pt" for r in range(world_size)]
    port = free_port()
    mp.start_processes(
        _entry,
        args=(world_size, port, cfg, steps, state_in, [str(f) for f in files]),
        nprocs=world_size,
        start_method="fork",
    )
    results = [torch.load(f) for f in files]
    assert all(r["state"] == results[0]["state"] for r in results), "state_dict differs between ranks"
    return results


def _entry(rank, world_size, port, cfg, steps, state_in, files):
    rank_main(rank, world_size, port, cfg, steps, state_in, files[rank])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fitscale.data.sources import build_synth
    from fitscale.data.writer import WriteSettings, write_dataset

    out = tmp_path_factory.mktemp("data") / "synth"
    settings = WriteSettings(
        writer="synth", max_image_tokens=256, num_classes=10, part_size=40, shard_size_limit=1 << 16
    )
    write_dataset(out, range(NUM_IMAGES), build_synth(0, 256, 10, "float16"), settings, progress=False)
    return str(out)


@pytest.mark.parametrize("mode", ["images", "tokens"])
def test_same_world_size_resume_is_bit_identical(tmp_path, dataset, mode):
    cfg = DataConfig(
        path=dataset,
        batch_mode=mode,
        global_batch_size=16,
        token_budget=512,
        micro_batches_per_step=2 if mode == "tokens" else 1,  # images mode refuses another value
        num_workers=2,
        num_classes=10,
        pad_to_budget=mode == "tokens",
        packing_lookahead=32,
    )
    straight = run(tmp_path, "straight", 2, cfg, steps=8)
    first = run(tmp_path, "first", 2, cfg, steps=3)
    state_file = tmp_path / "state.pt"
    torch.save(first[0]["state"], state_file)
    resumed = run(tmp_path, "resumed", 2, cfg, steps=5, state_in=str(state_file))
    for rank in range(2):
        assert first[rank]["record"] + resumed[rank]["record"] == straight[rank]["record"]
    assert straight[0]["epoch"] >= 1  # crossed an epoch boundary


@pytest.mark.parametrize("new_world_size", [1, 3])
def test_other_world_size_sees_every_image_of_the_epoch_once(tmp_path, dataset, new_world_size):
    cfg = DataConfig(path=dataset, global_batch_size=16, token_budget=512, num_workers=1, num_classes=10)
    steps_per_epoch = NUM_IMAGES // 16
    first = run(tmp_path, "first", 2, cfg, steps=2)
    state_file = tmp_path / "state.pt"
    torch.save(first[0]["state"], state_file)
    rest = run(tmp_path, "rest", new_world_size, cfg, steps=steps_per_epoch - 2, state_in=str(state_file))
    ids = [i for result in first + rest for step in result["record"] for i in step["ids"]]
    assert sorted(ids) == list(range(NUM_IMAGES))
    assert all(step["global_num_images"] == 16 for result in rest for step in result["record"])
    assert rest[0]["epoch"] == 1 and rest[0]["state"]["cursor"] == 0
