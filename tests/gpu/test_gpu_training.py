"""GPU checks (skipped without CUDA; run by tools/gpu_check.sh): whole-model backends in bf16,
torch.compile, a world-size-1 FSDP2 step in bf16 with fp32 master weights, a DCP round trip."""

import os
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)

GRIDS = [(16, 16), (12, 20), (8, 8), (5, 31), (32, 32), (20, 40), (9, 50)]


def packed_inputs(device="cuda"):
    from fitscale.data.batch import pack_images

    torch.manual_seed(0)
    images = [torch.randn(r * c, 16) for r, c in GRIDS]
    batch = pack_images(images, GRIDS, list(range(len(GRIDS))), list(range(len(GRIDS)))).to(device)
    t = torch.rand(len(GRIDS), device=device)
    return batch, t


def make_model(backend, depth=4, name="fitv2-xl-hr"):
    from fitscale.models import build_model

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_model(name, depth=depth, attn_backend=backend)
    for param in model.parameters():  # every parameter non-zero, as the equivalence acceptance asks
        torch.nn.init.normal_(param, std=0.02)
    return model.eval()


def available_backends():
    from fitscale.models.attention import flash_attn_available, torch_varlen_available

    names = ["flex"]
    names += ["varlen"] if torch_varlen_available() else []
    names += ["flash"] if flash_attn_available() else []
    return names


@pytest.mark.parametrize("backend", ["flex", "varlen", "flash"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_whole_model_bf16_backend_matches_fp32_reference(backend, compiled):
    if backend not in available_backends():
        pytest.skip(f"{backend} is not available here")
    from fitscale.parallel.compile import apply_compile

    batch, t = packed_inputs()
    reference = make_model("reference")
    with torch.no_grad():
        expected = reference(batch.tokens, t, batch.labels, batch.pos, batch.cu_seqlens, batch.max_seqlen)
    model = make_model(backend).to(torch.bfloat16)
    apply_compile(model, compiled)
    with torch.no_grad():
        out = model(batch.tokens.bfloat16(), t, batch.labels, batch.pos, batch.cu_seqlens, batch.max_seqlen)
    start = 0
    for index, (rows, cols) in enumerate(GRIDS):  # every image within bf16 tolerance
        end = start + rows * cols
        error = (out[start:end].float() - expected[start:end]).norm() / expected[start:end].norm()
        assert error < 3e-2, f"image {index} ({rows}x{cols}): relative error {error:.3e}"
        start = end


@pytest.fixture
def single_rank_group():
    import torch.distributed as dist

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.destroy_process_group()


def test_fsdp_bf16_step_and_checkpoint_round_trip(single_rank_group, tmp_path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from fitscale.checkpoint import CheckpointManager
    from fitscale.checkpoint.stateful import ModelState, OptimizerState
    from fitscale.config.checkpoint import CheckpointConfig
    from fitscale.config.parallel import ParallelConfig
    from fitscale.parallel import apply_compile, apply_fsdp

    backend = "varlen" if "varlen" in available_backends() else "flex"
    model = make_model(backend, depth=2).train()
    apply_compile(model, True)
    mesh = init_device_mesh("cuda", (1,), mesh_dim_names=("shard",))
    apply_fsdp(model, mesh, ParallelConfig(), torch.device("cuda"))
    assert isinstance(model.blocks[0].attn.qkv.weight, DTensor)
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32  # fp32 master weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch, t = packed_inputs()
    for _ in range(2):
        velocity = model(batch.tokens, t, batch.labels, batch.pos, batch.cu_seqlens, batch.max_seqlen)
        assert velocity.dtype == torch.bfloat16  # bf16 compute
        loss = velocity.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(loss)
    manager = CheckpointManager(tmp_path, CheckpointConfig(), handle_signals=False)
    state = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
    manager.save(2, state)
    manager.wait()
    saved = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    manager.load(2, state)
    for key, value in model.state_dict().items():
        assert torch.equal(value.full_tensor(), saved[key]), key
    manager.close()
