"""EMA of the weights: the averaging rule, its warmup, intervals, swapping in for evaluation, state round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fitscale.config.optim import EMAConfig
from fitscale.parallel.ema import EMA, ema_decay, ema_initial_weight


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
    ema = EMA(model, EMAConfig(decay=0.9, warmup="none"))
    shift(model, 1.0)
    ema.update(1)
    for key, value in start.items():
        torch.testing.assert_close(ema.shadow[key], value + 0.1)

    every = EMA(make_model(), EMAConfig(decay=0.9, update_every=2, warmup="none"))
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
    ema = EMA(model, EMAConfig(decay=0.99, start_step=2, warmup="none"))
    shift(model, 1.0)
    ema.update(2)
    for name, param in model.named_parameters():
        assert torch.equal(ema.shadow[name], param)
    shift(model, 1.0)
    ema.update(3)
    assert not torch.equal(ema.shadow["0.bias"], model[0].bias)


def test_warmup_decay_is_the_closed_form_of_diffusers_ema():
    """diffusers `EMAModel.get_decay` with t = step - update_after_step - 1: 0 while t <= 0, then
    1 - (1 + t / inv_gamma) ** -power or (1 + t) / (10 + t), never above `decay`."""
    power = EMAConfig(decay=0.9999, warmup="power", inv_gamma=1.0, power=2 / 3)
    assert [ema_decay(power, s) for s in (1, 2, 3)] == [0.0, 1 - 2 ** (-2 / 3), 1 - 3 ** (-2 / 3)]
    # diffusers' note on these values: decay 0.999 at 31.6k steps, 0.9999 at 1M steps (then capped).
    assert ema_decay(power, 31_623) == pytest.approx(0.999, abs=1e-8)
    assert ema_decay(power, 10**6) == pytest.approx(0.9999, abs=1e-9)
    assert ema_decay(power, 10**7) == 0.9999
    slow = EMAConfig(decay=0.999, warmup="power", inv_gamma=10.0, power=0.75, start_step=5)
    assert ema_decay(slow, 6) == 0.0 and ema_decay(slow, 26) == 1 - (1 + 20 / 10.0) ** -0.75
    ratio = EMAConfig(decay=0.99, warmup="ratio")
    assert [ema_decay(ratio, s) for s in (1, 2, 11)] == [0.0, 2 / 11, 11 / 20]
    assert ema_decay(ratio, 891) == 0.99  # (1 + 890) / 900 = 0.99, the cap from here on
    none = EMAConfig(decay=0.99, warmup="none", start_step=3)
    assert [ema_decay(none, s) for s in (3, 4, 10**6)] == [0.0, 0.99, 0.99]


@pytest.mark.numeric
def test_power_warmup_with_unit_power_is_the_running_mean():
    """inv_gamma = power = 1 gives decay 1 - 1 / step: the EMA is the plain mean of all weights so far."""
    model = make_model()
    ema = EMA(model, EMAConfig(decay=0.999999, warmup="power", inv_gamma=1.0, power=1.0))
    seen = []
    for step in range(1, 9):
        shift(model, float(step) ** 0.5)
        seen.append(model[0].weight.detach().clone())
        ema.update(step)
    # fp32: 8 lerps vs one mean, each a few roundings of |w| <= 8 (measured 4.8e-7, ratio 0.06)
    torch.testing.assert_close(ema.shadow["0.weight"], torch.stack(seen).mean(0), rtol=1e-6, atol=1e-6)


def test_warmup_ema_saved_and_resumed_equals_the_uninterrupted_one():
    """The decay depends on the step only: an EMA rebuilt from its state at step 4 continues bit-identically."""
    cfg = EMAConfig(decay=0.99, warmup="power", power=0.75, update_every=2)

    def train(ema: EMA, model: nn.Module, steps: range) -> None:
        for step in steps:
            with torch.no_grad():
                for param in model.parameters():
                    param.mul_(0.9).add_(torch.sin(param * step))
            ema.update(step)

    model = make_model()
    uninterrupted = EMA(model, cfg)
    train(uninterrupted, model, range(1, 11))
    model = make_model()
    first = EMA(model, cfg)
    train(first, model, range(1, 5))
    saved = {"params": {k: v.clone() for k, v in first.state_dict()["params"].items()}, "num_updates": 2}
    resumed = EMA(model, cfg)
    resumed.load_state_dict(saved)
    train(resumed, model, range(5, 11))
    assert resumed.num_updates == uninterrupted.num_updates == 5
    for name, value in uninterrupted.shadow.items():
        assert torch.equal(resumed.shadow[name], value), name


def test_weight_left_on_the_initial_weights_matches_an_ema_of_a_unit_step():
    """Weights 1 at init and 0 after: the EMA's value is exactly the weight it keeps on the init."""
    for cfg, steps in (
        (EMAConfig(decay=0.99, warmup="none"), 24),
        (EMAConfig(decay=0.9, warmup="none", update_every=3), 20),
        (EMAConfig(decay=0.9, warmup="ratio", update_every=2), 9),
        (EMAConfig(decay=0.99, warmup="power", start_step=2), 30),
    ):
        model = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(1.0)
        ema = EMA(model, cfg)
        with torch.no_grad():
            model.weight.fill_(0.0)
        for step in range(1, steps + 1):
            ema.update(step)
        # fp32 products of the decays vs the float64 closed form: measured 5.1e-7 relative (20x)
        assert ema_initial_weight(cfg, steps) == pytest.approx(
            float(ema.shadow["weight"]), rel=1e-5, abs=1e-9
        )
    assert ema_initial_weight(EMAConfig(decay=0.99, warmup="none"), 24) == pytest.approx(0.99**24)
    assert ema_initial_weight(EMAConfig(decay=0.99), 24) == 0.0


def test_warmup_config_errors_name_the_field():
    from fitscale.config.errors import ConfigError

    with pytest.raises(ConfigError, match=r"optim.ema.warmup: 'linear' is not one of none, ratio, power"):
        EMAConfig(warmup="linear")
    with pytest.raises(ConfigError, match=r"optim.ema.power: must be > 0, got 0"):
        EMAConfig(power=0)


def test_shadow_is_fp32_for_bf16_weights():
    model = make_model(torch.bfloat16)
    ema = EMA(model, EMAConfig(decay=0.999))
    assert all(s.dtype == torch.float32 for s in ema.shadow.values())
    shift(model, 0.5)
    ema.update(1)  # an increment far below bf16 resolution still accumulates in fp32
    assert (ema.shadow["0.bias"] - model[0].bias.float() + 0.5).abs().max() > 0


def test_swap_into_restores_the_training_weights_exactly():
    model = make_model()
    ema = EMA(model, EMAConfig(decay=0.5, warmup="none"))
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
    from fitscale.compat import checkpoint_wrapper

    model = nn.Sequential(checkpoint_wrapper(nn.Linear(2, 2)))
    assert sorted(EMA(model, EMAConfig()).shadow) == ["0.bias", "0.weight"]
