"""Checkpointing CUDA training state (skipped without CUDA): asynchronous DCP save next to an NCCL
process group, fused AdamW and the EMA on FSDP2 DTensors, and the MFU peak of this GPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


@pytest.fixture
def nccl_group(tmp_path):
    """A world-size-1 process group with NCCL for CUDA and gloo for CPU, as a GPU run has."""
    torch.cuda.set_device(0)
    dist.init_process_group(
        "cuda:nccl,cpu:gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_async_save_of_fsdp_cuda_state_restores_it_exactly(nccl_group, tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from fitscale.checkpoint import CheckpointManager, ModelState, OptimizerState, PerRankState, RNGState
    from fitscale.config.checkpoint import CheckpointConfig
    from fitscale.config.optim import EMAConfig, OptimConfig
    from fitscale.data.batch import pack_images
    from fitscale.models import build_model
    from fitscale.parallel.ema import EMA
    from fitscale.train.optim import build_optimizer

    def training():
        torch.manual_seed(0)
        mesh = init_device_mesh("cuda", (1,))
        with torch.device("cuda"):
            model = build_model("tiny")
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = build_optimizer(model, OptimConfig(lr=1e-3))
        ema = EMA(model, EMAConfig(decay=0.5))
        return model, optimizer, ema

    def step(model, optimizer, ema, number):
        grids = [(4, 4), (3, 5)]
        batch = pack_images([torch.randn(r * c, 16) for r, c in grids], grids, [1, 2], [0, 1], null_class=10)
        batch = batch.to("cuda")
        out = model(batch.tokens, torch.rand(2, device="cuda"), batch.labels, batch.pos, batch.cu_seqlens)
        (out - batch.tokens).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(number)

    def snapshot(model, optimizer, ema):
        tensors = {f"model.{k}": v.full_tensor().clone() for k, v in model.state_dict().items()}
        tensors |= {f"ema.{k}": v.full_tensor().clone() for k, v in ema.shadow.items()}
        for name, param in model.named_parameters():
            for key, value in optimizer.state[param].items():
                local = value.full_tensor() if isinstance(value, DTensor) else value
                tensors[f"optim.{name}.{key}"] = local.clone()
        return tensors

    model, optimizer, ema = training()
    assert optimizer.defaults["fused"] is True
    shadow = ema.shadow["blocks.0.attn.qkv.weight"]
    assert isinstance(shadow, DTensor) and shadow.device.type == "cuda" and shadow.dtype == torch.float32
    torch.manual_seed(1)
    step(model, optimizer, ema, 1)
    expected = snapshot(model, optimizer, ema)
    state = lambda m, o, e: {
        "model": ModelState(m),
        "optimizer": OptimizerState(m, o),
        "ema": e,
        "rng": PerRankState(RNGState()),
    }
    manager = CheckpointManager(tmp_path, CheckpointConfig(async_save=True), handle_signals=False)
    manager.save(1, state(model, optimizer, ema))
    step(model, optimizer, ema, 2)  # overlaps with the background write
    manager.wait()
    assert manager.complete_steps() == [1]

    fresh = training()
    manager.load(1, state(*fresh))
    restored = snapshot(*fresh)
    assert restored.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(restored[key], value), key
    manager.close()


def test_this_gpu_has_a_peak_for_mfu():
    from fitscale.train.metrics import peak_flops

    name = torch.cuda.get_device_name()
    if not any(key in name for key in ("H100", "H200", "A100")):
        pytest.skip(f"{name} is not one of the GPUs this check knows")
    assert peak_flops("cuda") is not None, name
