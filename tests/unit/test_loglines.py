"""The key=value log lines: formatting round-trips and the step line's fields."""

import logging

import pytest

from fitscale.train.loglines import StepLine, format_duration, format_fields, parse_fields


def test_fields_round_trip_through_a_logged_line():
    fields = {"event": "checkpoint", "step": 400, "path": "runs/my run/step-400", "loss": 0.123456, "x": None}
    line = "2026-11-30 10:02:11 INFO fitscale.train: " + format_fields(fields)
    assert parse_fields(line) == {
        "event": "checkpoint",
        "step": "400",
        "path": "runs/my run/step-400",
        "loss": "0.1235",
        "x": "-",
    }


def test_step_line_fields_and_eta(caplog):
    line = StepLine(every=10, total_steps=100, start_step=20)
    line.started -= 80.0  # 80 s for the 40 steps since the start: 2 s a step
    metrics = {
        "loss": 0.5,
        "grad_norm": 1.25,
        "lr": 1e-4,
        "perf/images_per_s": 100.0,
        "perf/real_tokens_per_s": 2000.0,
        "mem/max_rss_gib": 1.5,
        "perf/data_wait_s": 0.25,
    }
    with caplog.at_level(logging.INFO, logger="fitscale.train"):
        line.maybe_write(59, metrics)  # not a log step
        line.maybe_write(60, metrics)
    assert len(caplog.records) == 1
    fields = parse_fields(caplog.records[0].getMessage())
    assert fields == {
        "step": "60/100",
        "loss": "0.5",
        "grad_norm": "1.25",
        "lr": "0.0001",
        "images_per_s": "100",
        "real_tokens_per_s": "2000",
        "mfu": "-",
        "peak_mem_gib": "1.5",
        "data_wait_s": "0.25",
        "eta": fields["eta"],
    }
    assert 79 <= sum(int(p) * 60**i for i, p in enumerate(reversed(fields["eta"].split(":")))) <= 81


@pytest.mark.parametrize("seconds, text", [(0, "0:00:00"), (3725.4, "1:02:05"), (90000, "1 day, 1:00:00")])
def test_duration(seconds, text):
    assert format_duration(seconds) == text


def test_metrics_events_are_also_log_lines_on_rank_zero(tmp_path, caplog):
    from fitscale.config.log import LogConfig
    from fitscale.train.metrics import MetricsLogger

    with caplog.at_level(logging.INFO, logger="fitscale.train"):
        for rank in (1, 0):
            logger = MetricsLogger(tmp_path / f"r{rank}", LogConfig(wandb="disabled", console="on"), rank)
            logger.event("nonfinite_step_skipped", 7, loss=float("nan"), grad_norm=3.5)
            logger.close()
    assert [parse_fields(r.getMessage()) for r in caplog.records] == [
        {"event": "start", "step": "0", "attempt": "1"},
        {"event": "nonfinite_step_skipped", "step": "7", "loss": "-", "grad_norm": "3.5"},
    ]
