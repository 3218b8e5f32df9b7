"""AdamW builder, learning-rate schedules and the optimisation config section."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fitscale.config.errors import ConfigError
from fitscale.config.optim import EMAConfig, OptimConfig, ScheduleConfig
from fitscale.train.optim import apex_fused_adam, build_optimizer, parameter_groups, scaled_lr
from fitscale.train.schedule import build_lr_scheduler, lr_factor


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding_table = nn.Embedding(5, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, labels):
        return self.head(torch.tanh(self.body(self.embedding_table(labels))))


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    torch.manual_seed(1)
    for _ in range(steps):
        model(torch.randint(0, 5, (16,))).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_weight_decay_groups_and_frozen_parameters():
    model = Net()
    model.head.weight.requires_grad_(False)
    groups = parameter_groups(model, OptimConfig(weight_decay=0.1))
    decayed, exempt = groups
    assert decayed["weight_decay"] == 0.1 and exempt["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model.body.weight)}
    assert {id(p) for p in exempt["params"]} == {
        id(model.embedding_table.weight),
        id(model.body.bias),
        id(model.head.bias),
    }


def test_frozen_weights_stay_bit_identical_under_weight_decay():
    torch.manual_seed(0)
    model = Net()
    model.body.requires_grad_(False)
    frozen = {k: v.clone() for k, v in model.body.state_dict().items()}
    train(model, build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.5)), steps=3)
    for key, value in model.body.state_dict().items():
        assert torch.equal(value, frozen[key])
    assert not torch.equal(model.head.weight, Net().head.weight)


def test_no_trainable_parameters_is_a_clear_error():
    model = Net().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters: check train.trainable"):
        build_optimizer(model, OptimConfig())


def test_implementation_choice_on_cpu():
    auto = build_optimizer(Net(), OptimConfig())
    assert auto.defaults["fused"] is True  # torch has fused AdamW kernels for CPU
    foreach = build_optimizer(Net(), OptimConfig(implementation="foreach"))
    assert foreach.defaults["foreach"] is True and not foreach.defaults["fused"]


@pytest.mark.numeric
def test_fused_and_foreach_agree():
    torch.manual_seed(0)
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    train(a, build_optimizer(a, OptimConfig(lr=1e-2, weight_decay=0.1, implementation="fused")), steps=5)
    train(b, build_optimizer(b, OptimConfig(lr=1e-2, weight_decay=0.1, implementation="foreach")), steps=5)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        # 5 fp32 AdamW steps, other kernels (fused vs foreach): measured 3e-8 abs, ratio 0.0075
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(apex_fused_adam() is not None, reason="a real NVIDIA apex is installed")
def test_apex_without_apex_says_how_to_get_it():
    with pytest.raises(
        ImportError, match=r"needs NVIDIA apex .*`pip install apex` installs an unrelated package"
    ):
        build_optimizer(Net(), OptimConfig(implementation="apex"))


def test_learning_rate_scales_with_global_batch():
    assert scaled_lr(OptimConfig(lr=1e-4), None) == 1e-4
    assert scaled_lr(OptimConfig(lr=1e-4, lr_scaling="linear", base_batch_size=256), 1024) == pytest.approx(
        4e-4
    )
    assert scaled_lr(OptimConfig(lr=1e-4, lr_scaling="sqrt", base_batch_size=256), 1024) == pytest.approx(
        2e-4
    )
    optimizer = build_optimizer(Net(), OptimConfig(lr=1e-4, lr_scaling="linear"), global_batch_size=512)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="optim.lr_scaling='linear' needs the global batch size"):
        build_optimizer(Net(), OptimConfig(lr_scaling="linear"))


def test_warmup_then_constant():
    cfg = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_factor(s, cfg, 100) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, ScheduleConfig(), 100) == 1.0


def test_cosine_reaches_the_floor_at_the_last_step():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(9, cfg, 110) == 1.0
    assert lr_factor(10, cfg, 110) == pytest.approx(1.0)
    assert lr_factor(60, cfg, 111) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(109, cfg, 110) == pytest.approx(0.1)


def test_warmup_stable_decay():
    cfg = ScheduleConfig(name="wsd", warmup_steps=2, decay_fraction=0.25, decay_shape="linear")
    factors = [lr_factor(s, cfg, 20) for s in range(20)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2:15] == [1.0] * 13  # stable until the last quarter
    assert factors[15] == 1.0 and factors[19] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(factors[15:], factors[16:]))
    sqrt = ScheduleConfig(name="wsd", decay_fraction=0.5, decay_shape="sqrt")
    assert lr_factor(16, sqrt, 22) == pytest.approx(1 - math.sqrt(0.5))


def test_scheduler_resume_keeps_the_position_and_takes_the_new_config():
    model = Net()
    optimizer = build_optimizer(model, OptimConfig(lr=1.0))
    scheduler = build_lr_scheduler(optimizer, ScheduleConfig(name="cosine"), total_steps=10)
    for _ in range(4):
        optimizer.step()
        scheduler.step()
    saved = scheduler.state_dict()
    longer = build_lr_scheduler(optimizer, ScheduleConfig(name="cosine"), total_steps=100)
    longer.load_state_dict(saved)
    assert longer.last_epoch == 4
    optimizer.step()
    longer.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr_factor(5, ScheduleConfig(name="cosine"), 100))


def test_schedule_needs_steps_after_warmup():
    optimizer = build_optimizer(Net(), OptimConfig())
    with pytest.raises(ValueError, match="warmup_steps=10 leaves no steps to decay in a run of 10"):
        build_lr_scheduler(optimizer, ScheduleConfig(name="cosine", warmup_steps=10), total_steps=10)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: OptimConfig(lr=0), "optim.lr: must be > 0, got 0"),
        (lambda: OptimConfig(implementation="adam8bit"), "optim.implementation: 'adam8bit' is not one of"),
        (
            lambda: OptimConfig(lr_scaling="cubic"),
            "optim.lr_scaling: 'cubic' is not one of none, linear, sqrt",
        ),
        (
            lambda: ScheduleConfig(name="step"),
            "optim.schedule.name: 'step' is not one of constant, cosine, wsd",
        ),
        (lambda: ScheduleConfig(decay_fraction=0), r"optim.schedule.decay_fraction: must be in \(0, 1\]"),
        (lambda: EMAConfig(decay=1.0), r"optim.ema.decay: must be in \[0, 1\), got 1.0"),
        (lambda: EMAConfig(update_every=0), "optim.ema.update_every: must be >= 1, got 0"),
    ],
)
def test_config_errors_name_the_field(build, message):
    with pytest.raises(ConfigError, match=message):
        build()
