"""EMA of the weights: the averaging rule, intervals, swapping in for evaluation, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fitscale.config.optim import EMAConfig
from fitscale.train.ema import EMA


def make_model(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(dtype)


def shift(model: nn.Module, amount: float) -> None:
    with torch.no_grad():
        for param in model.parameters():
            param.add_(amount)


def test_decay_per_step_and_interval():
    model = make_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, EMAConfig(decay=0.9))
    shift(model, 1.0)
    ema.update(1)
    for key, value in start.items():
        torch.testing.assert_close(ema.shadow[key], value + 0.1)

    every = EMA(make_model(), EMAConfig(decay=0.9, update_every=2))
    model = make_model()
    shift(model, 1.0)
    every._params = dict(model.named_parameters())
    every.update(1)  # not on the interval: unchanged
    torch.testing.assert_close(every.shadow["0.weight"], start["0.weight"])
    every.update(2)  # one update with decay**2 covers both steps
    torch.testing.assert_close(every.shadow["0.weight"], start["0.weight"] + (1 - 0.81))
    assert every.num_updates == 1


def test_copies_the_weights_until_start_step():
    model = make_model()
    ema = EMA(model, EMAConfig(decay=0.99, start_step=2))
    shift(model, 1.0)
    ema.update(2)
    for name, param in model.named_parameters():
        assert torch.equal(ema.shadow[name], param)
    shift(model, 1.0)
    ema.update(3)
    assert not torch.equal(ema.shadow["0.bias"], model[0].bias)


def test_shadow_is_fp32_for_bf16_weights():
    model = make_model(torch.bfloat16)
    ema = EMA(model, EMAConfig(decay=0.999))
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    shift(model, 0.5)
    ema.update(1)  # an increment far below bf16 resolution still accumulates in fp32
    assert (ema.shadow["0.bias"] - model[0].bias.float() + 0.5).abs().max() > 0


def test_swap_into_restores_the_training_weights_exactly():
    model = make_model()
    ema = EMA(model, EMAConfig(decay=0.5))
    shift(model, 1.0)
    ema.update(1)
    training = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 4)
    with ema.swap_into(model):
        for name, param in model.named_parameters():
            assert torch.equal(param, ema.shadow[name])
        averaged = model(x)
    for key, value in model.state_dict().items():
        assert torch.equal(value, training[key])
    assert not torch.equal(model(x), averaged)
    ema.copy_to(model)
    assert torch.equal(model(x), averaged)


def test_state_round_trip_and_mismatch():
    model = make_model()
    ema = EMA(model, EMAConfig(decay=0.5))
    shift(model, 1.0)
    ema.update(1)
    saved = {"params": {k: v.clone() for k, v in ema.state_dict()["params"].items()}, "num_updates": 1}
    fresh = EMA(make_model(), EMAConfig(decay=0.5))
    fresh.load_state_dict(saved)
    assert fresh.num_updates == 1
    for key, value in saved["params"].items():
        assert torch.equal(fresh.shadow[key], value)
    del saved["params"]["1.bias"]
    with pytest.raises(ValueError, match=r"EMA state does not match the model: missing \['1.bias'\]"):
        fresh.load_state_dict(saved)


def test_names_skip_wrapper_segments():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = nn.Sequential(checkpoint_wrapper(nn.Linear(2, 2)))
    assert sorted(EMA(model, EMAConfig()).shadow) == ["0.bias", "0.weight"]
