"""A malformed packed batch is refused where it enters the model or the loss, naming the field and values."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import torch

from fitscale.config.train import FlowConfig
from fitscale.data.batch import pack_images
from fitscale.flow import flow_loss
from fitscale.models import build_model
from fitscale.models.inputs import check_packed_batch

GRIDS = [(4, 4), (2, 3), (3, 5)]  # 16 + 6 + 15 = 37 tokens; tiny: 10 classes, 16 values a token


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


def inputs(token_budget: int | None = None) -> dict:
    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(r * c, 16, generator=generator) for r, c in GRIDS]
    batch = pack_images(images, GRIDS, [1, 2, 3], [0, 1, 2], token_budget=token_budget, null_class=10)
    return dict(
        x=batch.tokens,
        t=torch.full((batch.num_segments,), 0.5),
        y=batch.labels,
        pos=batch.pos,
        cu_seqlens=batch.cu_seqlens,
        max_seqlen=batch.max_seqlen,
        sizes=batch.sizes,
    )


def refused(model, message: str, **changes) -> None:
    with torch.no_grad(), pytest.raises(ValueError, match="^" + re.escape("packed batch: " + message) + "$"):
        model(**{**inputs(), **changes})


def test_valid_batches_pass_padding_and_zero_length_segments_included(model):
    with torch.no_grad():
        out = model(**inputs(token_budget=300))  # 37 tokens + 263 of padding segments (null class)
        assert out.shape == (300, 16)
        static = inputs()  # zero-length segments appended (static shapes), a longer max_seqlen
        static["cu_seqlens"] = torch.cat([static["cu_seqlens"], static["cu_seqlens"][-1:].expand(2)])
        static["t"] = torch.cat([static["t"], torch.ones(2)])
        static["y"] = torch.cat([static["y"], torch.tensor([10, 10])])  # the null class is a valid input
        static["sizes"] = torch.cat([static["sizes"], torch.ones(2, 2, dtype=torch.int64)])
        static["max_seqlen"] = 256
        assert torch.equal(model(**static), model(**inputs()))


def test_rows_past_the_last_boundary(model):
    x = inputs()["x"]
    extra = torch.cat([x, x[:2]])  # 39 rows, cu_seqlens ends at 37 (the quoted 946 vs 944)
    refused(
        model,
        "cu_seqlens[-1]=37 but x has 39 token rows; the segments must cover exactly the rows of x, "
        "no more, no fewer",
        x=extra,
        pos=torch.cat([inputs()["pos"], inputs()["pos"][:2]]),
    )
    refused(  # and fewer rows than the boundaries promise
        model,
        "cu_seqlens[-1]=37 but x has 36 token rows; the segments must cover exactly the rows of x, "
        "no more, no fewer",
        x=x[:36],
        pos=inputs()["pos"][:36],
    )


def test_boundaries_of_the_wrong_type_start_or_order(model):
    cu = inputs()["cu_seqlens"]
    refused(
        model,
        "cu_seqlens must be int32 (FlashAttention's boundary type), got torch.float32",
        cu_seqlens=cu.float(),
    )
    refused(
        model,
        "cu_seqlens must be int32 (FlashAttention's boundary type), got torch.int64",
        cu_seqlens=cu.long(),
    )
    refused(
        model,
        "cu_seqlens decreases: cu_seqlens[2]=14 after cu_seqlens[1]=16",
        cu_seqlens=torch.tensor([0, 16, 14, 37], dtype=torch.int32),
    )
    refused(model, "cu_seqlens[0]=1: the first segment must start at 0", cu_seqlens=cu + 1)


def test_labels_and_timesteps_out_of_range(model):
    refused(
        model,
        "y[1]=99 is not a label of this model: labels lie in [0, 10) and 10 is the null class",
        y=torch.tensor([1, 99, 3]),
    )
    refused(
        model,
        "y[0]=-1 is not a label of this model: labels lie in [0, 10) and 10 is the null class",
        y=torch.tensor([-1, 2, 3]),
    )
    refused(model, "y must be an integer tensor, got torch.float32", y=torch.tensor([1.0, 2.0, 3.0]))
    refused(
        model,
        "t[2]=-0.5 must be a finite time >= 0 (0 = noise, 1 = clean data)",
        t=torch.tensor([0.5, 0.5, -0.5]),
    )
    refused(
        model,
        "t[0]=nan must be a finite time >= 0 (0 = noise, 1 = clean data)",
        t=torch.tensor([float("nan"), 0.5, 0.5]),
    )
    refused(
        model,
        "t[1]=inf must be a finite time >= 0 (0 = noise, 1 = clean data)",
        t=torch.tensor([0.5, float("inf"), 0.5]),
    )
    refused(model, "t must have shape (3,), got (2,)", t=torch.tensor([0.5, 0.5]))


def test_positions_and_grids_that_disagree(model):
    pos = inputs()["pos"].clone()
    pos[17] = torch.tensor([2, 0])  # image 1 is 2x3: row 2 is outside
    refused(model, "pos[17]=(2, 0) is outside the 2x3 grid of its segment 1", pos=pos)
    pos = inputs()["pos"].clone()
    pos[3] = torch.tensor([0, -1])
    refused(model, "pos[3]=(0, -1) is negative", pos=pos)
    sizes = torch.tensor([[4, 4], [3, 2], [5, 3]])  # same areas, transposed grids pass the count...
    with torch.no_grad():  # ...so the positions catch them
        with pytest.raises(
            ValueError, match=re.escape("pos[18]=(0, 2) is outside the 3x2 grid of its segment 1")
        ):
            model(**{**inputs(), "sizes": sizes})
    refused(
        model,
        "segment 1 has 6 tokens (cu_seqlens) but its grid sizes[1]=2x4 needs rows*cols (or 0) = 8",
        sizes=torch.tensor([[4, 4], [2, 4], [3, 5]]),
    )
    refused(model, "max_seqlen=15 is shorter than segment 0 (16 tokens)", max_seqlen=15)


def test_token_width_and_devices(model):
    x = inputs()["x"]
    refused(model, "x must have shape (*, 16), got (37, 12)", x=x[:, :12])
    refused(model, "pos must have shape (37, 2), got (37, 3)", pos=torch.zeros(37, 3, dtype=torch.int64))
    refused(model, "pos is on meta but x is on cpu", pos=inputs()["pos"].to("meta"))


def test_values_of_device_tensors_are_not_read():
    """On an accelerator, reading values would cost a device sync: only metadata is checked there.

    Meta tensors have no values at all, so passing proves no value was read; the trainer checks
    the collator's host copy instead (Trainer._check_host_batch)."""
    bad = inputs()
    bad["y"] = torch.tensor([1, 99, 3])
    meta = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in bad.items()}
    check_packed_batch(**meta, token_dim=16, num_classes=10)
    with pytest.raises(ValueError, match=re.escape("y[1]=99")):
        check_packed_batch(**bad, token_dim=16, num_classes=10)


def test_the_loss_checks_its_own_inputs(model):
    images = [torch.randn(r * c, 16) for r, c in GRIDS]
    batch = pack_images(images, GRIDS, [1, 2, 3], [0, 1, 2], null_class=10)
    timesteps, noise = torch.full((3,), 0.5), torch.randn(37, 16)
    with pytest.raises(
        ValueError, match=re.escape("flow loss: timesteps must have shape (3,), one per segment, got (2,)")
    ):
        flow_loss(model, batch, timesteps[:2], noise, 3, FlowConfig())
    with pytest.raises(
        ValueError, match=re.escape("flow loss: noise has shape (36, 16), the tokens (37, 16)")
    ):
        flow_loss(model, batch, timesteps, noise[:36], 3, FlowConfig())
    with pytest.raises(
        ValueError, match=re.escape("flow loss: num_images=4 is not in [0, 3] (the segments)")
    ):
        flow_loss(model, replace(batch, num_images=4), timesteps, noise, 3, FlowConfig())
    with pytest.raises(
        ValueError, match=re.escape("flow loss: timesteps[1]=-0.25 is outside [0, 1] (1 = clean data)")
    ):
        flow_loss(model, batch, torch.tensor([0.5, -0.25, 0.5]), noise, 3, FlowConfig())
    with pytest.raises(
        ValueError, match=re.escape("flow loss: timesteps[2]=1.5 is outside [0, 1] (1 = clean data)")
    ):
        flow_loss(model, batch, torch.tensor([0.5, 0.5, 1.5]), noise, 3, FlowConfig())


def test_the_loss_checks_the_boundaries_before_it_reads_them(model):
    """The loss spreads timesteps over cu_seqlens before the model runs; bad boundaries get the
    model's one-line ValueError, not ATen's `allocated size does not match required size`."""
    images = [torch.randn(r * c, 16) for r, c in GRIDS]
    batch = pack_images(images, GRIDS, [1, 2, 3], [0, 1, 2], null_class=10)
    timesteps, noise = torch.full((3,), 0.5), torch.randn(37, 16)
    past_the_rows = batch.cu_seqlens.clone()
    past_the_rows[-1] = 40
    with pytest.raises(ValueError) as info:
        flow_loss(model, replace(batch, cu_seqlens=past_the_rows), timesteps, noise, 3, FlowConfig())
    assert str(info.value) == (
        "packed batch: cu_seqlens[-1]=40 but x has 37 token rows; "
        "the segments must cover exactly the rows of x, no more, no fewer"
    )
    decreasing = batch.cu_seqlens.clone()
    decreasing[1] = decreasing[2] + 1
    with pytest.raises(ValueError) as info:
        flow_loss(model, replace(batch, cu_seqlens=decreasing), timesteps, noise, 3, FlowConfig())
    assert str(info.value) == (
        f"packed batch: cu_seqlens decreases: cu_seqlens[2]={int(decreasing[2])} after "
        f"cu_seqlens[1]={int(decreasing[1])}"
    )
