"""Rectified-flow path, samplers and the packed loss."""

import pytest
import torch

from fitscale.config.train import FlowConfig
from fitscale.data.batch import pack_images
from fitscale.flow import (
    flow_loss,
    interpolate,
    per_image_noise,
    sample_timesteps,
    shift_time,
    velocity_target,
)


def test_path_ends_and_velocity():
    data, noise = torch.randn(5, 16), torch.randn(5, 16)
    assert torch.equal(interpolate(data, noise, torch.ones(5, 1)), data)
    assert torch.equal(interpolate(data, noise, torch.zeros(5, 1)), noise)
    assert torch.equal(velocity_target(data, noise), data - noise)


def test_time_shift_identity_and_direction():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t)
    assert (shift_time(t, 3.0) >= t).all() and (shift_time(t, 1 / 3) <= t).all()


@pytest.mark.numeric
def test_time_shift_is_undone_by_the_release_inverse_and_is_what_the_model_applies():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    for s in (0.3, 1.0, 3.0):
        # fit/model/fit_model.py line 269 maps shifted times back: t / (s + (1 - s) t)
        back = shift_time(t, s) / (s + (1 - s) * shift_time(t, s))
        torch.testing.assert_close(back, t)
    from fitscale.models import build_model

    torch.manual_seed(0)
    shifted, plain = build_model("tiny", time_shift=3.0).eval(), build_model("tiny").eval()
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    shifted.load_state_dict(plain.state_dict())
    x = torch.randn(8, 16).repeat(2, 1)  # the same image twice
    pos = torch.stack([torch.arange(16) % 8 // 4, torch.arange(16) % 4], 1)
    cu, y = torch.tensor([0, 8, 16], dtype=torch.int32), torch.tensor([1, 1])
    t = torch.tensor([0.3, 0.3])
    with torch.no_grad():
        ours = shifted(x, t, y, pos, cu)
        by_hand = plain(x, torch.stack([shift_time(t[0], 3.0), t[1]]), y, pos, cu)
    assert torch.equal(ours[:8], by_hand[:8])  # the model shifts its input time (the same arithmetic)
    # and the shift matters: 2.6e-3 measured, fp32 rounding would be below 1e-6
    assert (ours[8:] - by_hand[8:]).abs().max() > 1e-4


def test_logit_normal_median_follows_mean():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, "logit_normal", logit_mean=1.0, generator=g)
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)
    assert ((t > 0) & (t < 1)).all()


class Echo(torch.nn.Module):
    """Predicts zero velocity: the loss is then the mean squared target."""

    def forward(self, x, t, y, pos, cu_seqlens, max_seqlen=None, sizes=None):
        return torch.zeros_like(x)


@pytest.mark.numeric
def test_loss_weighs_images_equally_and_ignores_padding():
    images = [torch.randn(4, 16), torch.randn(12, 16)]
    batch = pack_images(images, [(2, 2), (3, 4)], [1, 2], [7, 8], token_budget=20)
    t, noise = per_image_noise(batch, seed=0, step=0, flow=FlowConfig())
    out = flow_loss(Echo(), batch, t, noise, global_num_images=2, flow=FlowConfig())
    target = batch.tokens - noise
    first = target[:4].square().mean()
    second = target[4:16].square().mean()
    # fp32 means over 64 and 192 values in other orders: ~1e-7 (measured 1.2e-7 on 1.9); default rtol 1.3e-6
    torch.testing.assert_close(out.loss, (first + second) / 2)
    assert out.per_image.shape == (2,)


def test_noise_depends_on_sample_not_on_batch_position():
    a, b = torch.randn(4, 16), torch.randn(9, 16)
    together = pack_images([a, b], [(2, 2), (3, 3)], [0, 0], [1, 2])
    alone = pack_images([b], [(3, 3)], [0], [2])
    t1, n1 = per_image_noise(together, 5, 3, FlowConfig())
    t2, n2 = per_image_noise(alone, 5, 3, FlowConfig())
    assert torch.equal(t1[1], t2[0]) and torch.equal(n1[4:], n2)
    _, other_step = per_image_noise(alone, 5, 4, FlowConfig())
    assert not torch.equal(other_step, n2)


def test_label_dropout_is_drawn_per_image_whatever_the_batch():
    """The same image at the same step loses its label or not, whichever batch it is packed in."""
    import torch

    from fitscale.data.batch import pack_images
    from fitscale.flow import per_image_label_dropout

    images = [torch.zeros(16, 16) for _ in range(40)]
    grids, labels, ids = [(4, 4)] * 40, [i % 10 for i in range(40)], list(range(100, 140))
    whole = pack_images(images, grids, labels, ids, token_budget=700, null_class=10)
    dropped = per_image_label_dropout(whole, seed=7, step=3, prob=0.5, null_class=10)
    assert 5 < int((dropped[:40] == 10).sum()) < 35
    assert dropped[40] == 10  # the padding segment keeps the null class
    half = pack_images(images[::2], grids[::2], labels[::2], ids[::2], null_class=10)
    assert torch.equal(per_image_label_dropout(half, 7, 3, 0.5, 10), dropped[:40:2])
    assert not torch.equal(per_image_label_dropout(whole, 7, 4, 0.5, 10), dropped)  # a new draw per step
    assert torch.equal(per_image_label_dropout(whole, 7, 3, 0.0, 10), whole.labels)
