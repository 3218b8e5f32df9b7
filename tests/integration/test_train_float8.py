"""float8 with FSDP2's float8 all-gather on 2 ranks (gloo, torchao emulation): checkpoints hold plain
master weights, and a run with float8 off resumes from them."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.train_runs import checkpoint_tensors, metric_records, model_weights, run

from fitscale.models import build_model

pytest.importorskip("torchao.float8", reason="the float8 extra (torchao) is not installed")
pytestmark = pytest.mark.slow

TINY16 = ["model.overrides.mlp_hidden_size=128", "parallel.float8_size_filter=false"]


def test_float8_all_gather_checkpoint_resumes_with_float8_off(tmp_path):
    run_dir = tmp_path / "run"
    float8 = ["parallel.float8=tensorwise", "parallel.float8_fsdp_all_gather=true"]
    result = run(run_dir, 2, *TINY16, *float8, "train.steps=2", "checkpoint.interval=2", pad_to=128)
    assert "float8 tensorwise: 10 linears converted" in result.stderr
    tensors = checkpoint_tensors(run_dir, 2)
    assert all(type(value) is torch.Tensor for value in tensors.values())  # no torchao subclass saved
    expected = {
        name: value.dtype for name, value in build_model("tiny", mlp_hidden_size=128).state_dict().items()
    }
    for section in ("model", "ema"):
        weights = model_weights(tensors, section)
        assert {name: value.dtype for name, value in weights.items()} == expected, section
    result = run(
        run_dir, 2, *TINY16, "parallel.float8=none", "train.steps=3", "checkpoint.interval=0", pad_to=128
    )
    assert "event=resume step=2" in result.stderr
    assert math.isfinite(metric_records(run_dir)[3]["loss"])
