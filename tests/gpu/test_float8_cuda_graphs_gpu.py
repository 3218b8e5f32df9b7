"""float8 matmuls and CUDA graphs on a GPU (skipped without CUDA; float8 needs torchao and compute
capability 8.9+): float8 forward and backward next to bf16, and trainer steps with CUDA graphs
next to the same compiled steps without them."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)


def float8_gpu() -> bool:
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(
    not torch.cuda.is_available() or not float8_gpu(), reason="needs torchao and an SM89+ GPU"
)
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_forward_and_backward_track_bf16(recipe):
    """A D=256 model (every token linear converted, real float8 matmuls) against the same weights in
    bf16: e4m3 keeps 3 mantissa bits, so outputs and gradients differ by a few percent, not more."""
    from fitscale.config.parallel import ParallelConfig
    from fitscale.data.batch import pack_images
    from fitscale.models import build_model
    from fitscale.parallel.float8 import apply_float8

    torch.manual_seed(0)
    with torch.device("cuda"):
        reference = build_model(
            "tiny", hidden_size=256, num_heads=4, mlp_hidden_size=512, attn_backend="reference"
        )
        model = build_model(
            "tiny", hidden_size=256, num_heads=4, mlp_hidden_size=512, attn_backend="reference"
        )
    for weight in reference.parameters():  # no zero-initialised gates: gradients reach every block
        if weight.dim() == 2:
            torch.nn.init.normal_(weight, std=0.02)
    model.load_state_dict(reference.state_dict())
    report = apply_float8(
        model, ParallelConfig(float8=recipe, float8_size_filter=False), torch.device("cuda")
    )
    assert len(report.converted) == 10
    grids = [(16, 16), (12, 16), (8, 8)]
    batch = pack_images(
        [torch.randn(r * c, 16) for r, c in grids], grids, [1, 2, 3], [0, 1, 2], null_class=10
    )
    batch = batch.to("cuda")
    t = torch.rand(3, device="cuda")
    outputs, grads = [], []
    for net in (reference, model):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(
                batch.tokens, t, batch.labels, batch.pos, batch.cu_seqlens, batch.max_seqlen, batch.sizes
            )
        out.float().square().mean().backward()
        outputs.append(out.detach().float())
        grads.append(net.blocks[0].attn.qkv.weight.grad.float())

    def relative(a, b):
        return float((a - b).norm() / b.norm())

    assert 0 < relative(outputs[1], outputs[0]) < 0.1
    assert 0 < relative(grads[1], grads[0]) < 0.2


def test_cuda_graph_steps_match_compiled_steps(tmp_path):
    """Three steps of the tiny model with `train.cuda_graphs` (static shapes, reduce-overhead) give
    the losses of the same compiled steps without graphs."""
    from helpers.train_worker import SeededSteps, worker_config

    from fitscale.config import load_config
    from fitscale.train.trainer import Trainer

    losses = {}
    for graphs in ("false", "true"):
        config = load_config(
            None,
            [
                *worker_config(tmp_path / graphs),
                "train.device=cuda",
                "model.overrides.attn_backend=auto",
                "log.wandb=disabled",
                "train.steps=3",
                "checkpoint.interval=0",
                "checkpoint.save_at_end=false",
                "parallel.compile=true",
                "data.pad_to_budget=true",
                "data.token_budget=256",
                f"train.cuda_graphs={graphs}",
            ],
        )
        trainer = Trainer(config, loader=SeededSteps(0, 1, 8, 1, 10, pad_to=256))
        try:
            trainer.train()
        finally:
            trainer.close()
        losses[graphs] = [record["loss"] for record in trainer.history]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
