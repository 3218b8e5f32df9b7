"""MetricsLogger sinks, secret scrubbing, MFU table, throughput and timestep buckets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fitscale.config.errors import ConfigError
from fitscale.config.log import LogConfig
from fitscale.hardware import lookup_peak_flops
from fitscale.train.metrics import (
    MetricsLogger,
    Throughput,
    memory_stats,
    mfu,
    peak_flops,
    scrub_secrets,
    timestep_bucket_metrics,
    timestep_bucket_sums,
)

QUIET = dict(wandb="disabled", progress_bar="off")


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_on_rank0_only_appended_across_resumes(tmp_path):
    logger = MetricsLogger(tmp_path, LogConfig(**QUIET), rank=0)
    logger.log(10, {"loss": torch.tensor(0.5), "lr": 1e-4, "grad_norm": float("nan")})
    logger.close()
    silent = MetricsLogger(tmp_path, LogConfig(**QUIET), rank=1)
    silent.log(10, {"loss": 1.0})
    silent.close()
    resumed = MetricsLogger(tmp_path, LogConfig(**QUIET), rank=0, start_step=10)
    resumed.log(20, {"loss": 0.25})
    resumed.close()
    lines = records(tmp_path / "metrics.jsonl")
    assert [(r.get("event"), r["step"]) for r in lines] == [
        ("start", 0),
        (None, 10),
        ("start", 10),
        (None, 20),
    ]
    assert lines[1]["loss"] == 0.5 and lines[1]["lr"] == 1e-4 and lines[1]["grad_norm"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_all_ranks_write_their_own_file(tmp_path):
    """With `log.all_ranks` rank 0 still keeps `metrics.jsonl`, the file status, report and the attempt
    count read (it wrote `metrics.rank0.jsonl`: every start was attempt 1 and status saw no metrics)."""
    for rank in (0, 1):
        for attempt in (1, 2):
            logger = MetricsLogger(tmp_path, LogConfig(all_ranks=True, **QUIET), rank=rank)
            logger.log(attempt, {"loss": 2.0 + rank})
            logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "metrics.rank1.jsonl"]
    for name, loss in (("metrics.jsonl", 2.0), ("metrics.rank1.jsonl", 3.0)):
        assert records(tmp_path / name)[-1]["loss"] == loss
        assert [r["attempt"] for r in records(tmp_path / name) if r.get("event") == "start"] == [1, 2]


def test_progress_bar_on_rank0(tmp_path, capsys):
    logger = MetricsLogger(tmp_path, LogConfig(wandb="disabled", progress_bar="on"), rank=0, total_steps=10)
    logger.update_progress(3)
    logger.log(5, {"loss": 0.125})
    logger.close()
    err = capsys.readouterr().err
    assert "5/10" in err and "loss=0.125" in err


def test_scrub_secrets():
    config = {
        "log": {"wandb_project": "p", "api_key": "abc"},
        "env": {"HF_TOKEN": "x", "paths": ["hf_abcdefghijklmnopqrstuvwxyz", "/data"]},
        "launch": {"password": 1, "note": "0123456789abcdef0123456789abcdef01234567"},
        "optim": {"lr": 1e-4},
    }
    scrubbed = scrub_secrets(config)
    assert scrubbed["log"] == {"wandb_project": "p", "api_key": "<redacted>"}
    assert scrubbed["env"] == {"HF_TOKEN": "<redacted>", "paths": ["<redacted>", "/data"]}
    assert scrubbed["launch"] == {"password": "<redacted>", "note": "<redacted>"}
    assert scrubbed["optim"] == {"lr": 1e-4}


def test_wandb_offline_never_records_secrets(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    config = {"log": {"wandb_api_key": secret}, "train": {"steps": 3}}
    logger = MetricsLogger(tmp_path, LogConfig(wandb="offline", progress_bar="off"), rank=0, config=config)
    logger.log(1, {"loss": 0.5})
    logger.close()
    files = [p for p in (tmp_path / "wandb").rglob("*") if p.is_file()]
    assert files, "wandb wrote nothing offline"
    assert not any(secret.encode() in p.read_bytes() for p in files)
    assert (tmp_path / "wandb_run_id").read_text()  # a resumed run continues the same wandb run


def test_peak_table_and_mfu():
    assert lookup_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert lookup_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert lookup_peak_flops("NVIDIA H200") == 989e12
    assert lookup_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert lookup_peak_flops("NVIDIA L40S") == 362e12 and lookup_peak_flops("NVIDIA L4") == 121e12
    assert lookup_peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert lookup_peak_flops("Some Future GPU") is None
    assert peak_flops("cpu") is None and mfu(1e12, "cpu") is None
    assert mfu(2.5e14, "cpu", peak=1e15) == 0.25


def test_throughput_rates():
    meter = Throughput(world_size=2, peak=1e12)
    meter.update(images=8, real_tokens=1000, tokens=1250, flops=4e12)
    rates = meter.rates()
    assert rates["perf/packing_efficiency"] == 0.8
    assert rates["perf/real_tokens_per_s"] / rates["perf/images_per_s"] == pytest.approx(125)
    assert rates["perf/mfu"] == pytest.approx(rates["perf/tflops_per_device"])
    assert meter.rates()["perf/images_per_s"] == 0  # a new window


def test_timestep_buckets():
    sums, counts = timestep_bucket_sums(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.1, 0.2, 1.0]), 4)
    assert sums.tolist() == [3.0, 0.0, 0.0, 4.0] and counts.tolist() == [2.0, 0.0, 0.0, 1.0]
    assert timestep_bucket_metrics(sums, counts) == {"loss/t0.00-0.25": 1.5, "loss/t0.75-1.00": 4.0}


def test_memory_stats_on_cpu():
    stats = memory_stats("cpu")
    assert stats["mem/max_rss_gib"] > 0 and math.isfinite(stats["mem/max_rss_gib"])


def test_log_config_errors():
    with pytest.raises(ConfigError, match="log.wandb: 'cloud' is not one of offline, online, disabled"):
        LogConfig(wandb="cloud")
    with pytest.raises(ConfigError, match="log.every: must be >= 1, got 0"):
        LogConfig(every=0)
