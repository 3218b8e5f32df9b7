"""parallel.cuda_graphs on CPU: the refusal, the config rules, and the static shapes it gives the model
(one segment count and one max_seqlen in every forward, the loss and gradients of the batch as packed)."""

from __future__ import annotations

import pytest
import torch
from helpers.train_worker import SeededSteps, worker_config

from fitscale.config import load_config
from fitscale.config.errors import ConfigError
from fitscale.flow import flow_loss, per_image_noise
from fitscale.models import build_model
from fitscale.parallel.cuda_graphs import (
    StaticShapes,
    apply_static_shapes,
    maybe_apply_cuda_graphs,
    static_shapes,
)

CUDA_GRAPHS = ["train.cuda_graphs=true", "parallel.compile=true", "data.pad_to_budget=true"]


def config(tmp_path, *overrides):
    return load_config(None, [*worker_config(tmp_path), "data.token_budget=256", *overrides])


def test_cuda_graphs_refuse_a_cpu_in_one_line(tmp_path):
    with torch.device("meta"):
        model = build_model("tiny")
    with pytest.raises(ConfigError) as error:
        maybe_apply_cuda_graphs(model, config(tmp_path, *CUDA_GRAPHS), torch.device("cpu"), 1)
    assert str(error.value) == (
        "train.cuda_graphs=true needs a CUDA device, this run is on cpu; set train.cuda_graphs=false"
    )
    assert maybe_apply_cuda_graphs(model, config(tmp_path), torch.device("cpu"), 1) is None


def test_cuda_graphs_need_compile(tmp_path):
    with pytest.raises(ConfigError) as error:
        config(tmp_path, "train.cuda_graphs=true", "data.pad_to_budget=true").validate()
    assert str(error.value) == (
        "train.cuda_graphs=true replays compiled blocks: set parallel.compile=true "
        "(with data.pad_to_budget=true) or train.cuda_graphs=false"
    )


def test_static_shapes_bound_every_budget_batch(tmp_path):
    shapes = static_shapes(config(tmp_path, "data.min_image_tokens=16"))
    # at most 256 // 16 = 16 images, plus two padding segments of up to 128 tokens
    assert shapes == StaticShapes(num_segments=18, max_seqlen=256)


@pytest.mark.parametrize("backend", ["reference", "grouped"])
def test_static_shapes_keep_the_loss_and_gradients_of_each_step(tmp_path, backend):
    """Steps of 1 to 3 images padded to a 128-token budget: with static shapes every block sees 12
    segments and max_seqlen 128, and the loss and every gradient are those of the packed batch."""
    torch.manual_seed(0)
    model = build_model("tiny", attn_backend=backend)
    model.y_embedder.dropout_prob = 0.0
    static = build_model("tiny", attn_backend=backend)
    static.load_state_dict(model.state_dict())
    static.y_embedder.dropout_prob = 0.0
    shapes = StaticShapes(num_segments=12, max_seqlen=128)
    apply_static_shapes(static, shapes)
    seen: list[tuple[int, int]] = []
    static.blocks[0].register_forward_pre_hook(
        lambda module, args: seen.append((args[3].cu_seqlens.numel() - 1, args[3].max_seqlen))
    )
    flow = config(tmp_path).train.flow
    segment_counts = set()
    for step, images in enumerate((1, 3, 2)):
        batch = SeededSteps(0, 1, images, 1, 10, pad_to=128).batch(step).micro_batches[0]
        segment_counts.add(batch.num_segments)
        timesteps, noise = per_image_noise(batch, 0, step, flow)
        losses, grads = [], []
        for net in (model, static):
            net.zero_grad()
            out = flow_loss(net, batch, timesteps, noise, batch.num_images, flow)
            out.loss.backward()
            losses.append(out.loss.detach())
            grads.append({name: p.grad.clone() for name, p in net.named_parameters()})
        assert torch.equal(losses[0], losses[1]), step
        for name, grad in grads[0].items():
            assert torch.equal(grad, grads[1][name]), (step, name)
    assert len(segment_counts) > 1  # the packed steps differ in shape ...
    assert seen == [(12, 128)] * 3  # ... the static ones do not


def test_a_batch_past_the_static_shapes_is_refused():
    model = build_model("tiny", attn_backend="reference")
    apply_static_shapes(model, StaticShapes(num_segments=2, max_seqlen=64))
    batch = SeededSteps(0, 1, 3, 1, 10).batch(0).micro_batches[0]
    with pytest.raises(ValueError, match="a micro-batch of 3 segments .* exceeds the static shapes"):
        model(
            batch.tokens,
            torch.ones(3),
            batch.labels,
            batch.pos,
            batch.cu_seqlens,
            batch.max_seqlen,
            batch.sizes,
        )
