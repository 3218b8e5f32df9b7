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


def test_logit_normal_median_follows_mean():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, "logit_normal", logit_mean=1.0, generator=g)
    assert t.median().item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01)
    assert ((t > 0) & (t < 1)).all()


class Echo(torch.nn.Module):
    """Predicts zero velocity: the loss is then the mean squared target."""

    def forward(self, x, t, y, pos, cu_seqlens, max_seqlen=None, sizes=None):
        return torch.zeros_like(x)


def test_loss_weighs_images_equally_and_ignores_padding():
    images = [torch.randn(4, 16), torch.randn(12, 16)]
    batch = pack_images(images, [(2, 2), (3, 4)], [1, 2], [7, 8], token_budget=20)
    t, noise = per_image_noise(batch, seed=0, step=0, flow=FlowConfig())
    out = flow_loss(Echo(), batch, t, noise, global_num_images=2, flow=FlowConfig())
    target = batch.tokens - noise
    first = target[:4].square().mean()
    second = target[4:16].square().mean()
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
