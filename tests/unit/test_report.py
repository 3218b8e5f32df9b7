"""Run histories read back from metrics.jsonl: segments between restarts, the last record of a
repeated step, time lost to restarts, the summary numbers and `fitscale status`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fitscale.report.history import read_history, summarize
from fitscale.report.status import run_status


def write_metrics(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(json.dumps(line) for line in lines) + "\n"
    (folder / "metrics.jsonl").write_text(text + '{"step": 9, "loss": 0.1')  # a line cut short by a crash
    return folder


@pytest.fixture
def resumed_run(tmp_path):
    # steps 1-4 at t=100..103; killed; restarted at t=200 from the step-2 checkpoint, redoing 3 and 4
    return write_metrics(
        tmp_path / "run",
        [
            {"event": "start", "step": 0, "time": 99.0},
            *({"step": s, "time": 99.0 + s, "loss": 1.0 / s, "flops": 10.0} for s in (1, 2, 3, 4)),
            {"event": "start", "step": 2, "time": 200.0},
            {
                "step": 3,
                "time": 210.0,
                "loss": 0.3,
                "flops": 10.0,
                "perf/images_per_s": 50.0,
                "val_loss": 0.9,
            },
            {
                "step": 4,
                "time": 211.0,
                "loss": 0.2,
                "flops": 10.0,
                "perf/images_per_s": 70.0,
                "val_loss": 0.7,
            },
            {
                "step": 5,
                "time": 212.0,
                "loss": 0.1,
                "flops": 10.0,
                "perf/images_per_s": 40.0,
                "val_loss": 0.8,
            },
        ],
    )


def test_segments_and_last_record_of_each_step(resumed_run):
    with pytest.warns(
        UserWarning, match=r"metrics.jsonl:10: skipped a line that is not a whole metrics record"
    ):
        history = read_history(resumed_run)
    # the first attempt's steps 3 and 4 were superseded by the restart from step 2
    assert [(s.start_step, len(s.records)) for s in history.segments] == [(0, 2), (2, 3)]
    assert history.series("loss") == ([1, 2, 3, 4, 5], [1.0, 0.5, 0.3, 0.2, 0.1])
    assert history.cumulative_flops() == {1: 10.0, 2: 20.0, 3: 30.0, 4: 40.0, 5: 50.0}


def test_summary_numbers(resumed_run):
    summary = summarize(read_history(resumed_run))
    assert summary["restarts"] == 1 and summary["step"] == 5
    assert (summary["best_val_loss"], summary["best_val_loss_step"]) == (0.7, 4)
    assert summary["median_images_per_s"] == 50.0
    # last record before the restart at t=103 (step 4); step 4 reached again at t=211
    assert summary["seconds_lost_to_restarts"] == 108.0
    assert summary["wall_seconds"] == 212.0 - 99.0
    assert summary["training_flops"] == 50.0


def test_status_of_a_stopped_run(resumed_run):
    (resumed_run / "config.yaml").write_text("train:\n  steps: 10\ncheckpoint:\n  folder: checkpoints\n")
    status = run_status(resumed_run, now=222.0)
    assert status["alive"] is False and status["holder"] is None
    assert (status["step"], status["steps"], status["restarts"]) == (5, 10, 1)
    assert status["checkpoint"] is None and status["eta_s"] is None
    assert status["last_metrics"] == {"loss": 0.1, "perf/images_per_s": 40.0, "val_loss": 0.8}
    assert status["last_metrics_age_s"] == 10.0


def test_status_of_a_live_run_has_its_holder_and_eta(resumed_run):
    from fitscale.train.lock import RunLock

    (resumed_run / "config.yaml").write_text("train:\n  steps: 10\n")
    with RunLock(resumed_run):
        status = run_status(resumed_run)
    assert status["alive"] is True and status["holder"]["pid"] > 0
    assert status["eta_s"] == pytest.approx(5 * 1.0)  # 1 s a step in the newest segment, 5 steps to go


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no metrics.jsonl; pass a run folder"):
        read_history(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"not a run folder \(no metrics.jsonl, config.yaml or .lock\)"
    ):
        run_status(tmp_path)


def test_plots_of_a_resumed_run_with_mfu(resumed_run, tmp_path):
    from fitscale.report.history import read_history
    from fitscale.report.plots import write_plots

    lines = [json.loads(line) for line in (resumed_run / "metrics.jsonl").read_text().splitlines()[:-1]]
    for line in lines:
        if "perf/images_per_s" in line:
            line["perf/mfu"] = line["perf/images_per_s"] / 100
    other = write_metrics(tmp_path / "other", lines)
    written = write_plots([read_history(resumed_run), read_history(other)], tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "timesteps.png", "optim.png", "throughput.png"]
    assert all(p.stat().st_size > 10_000 for p in written)


def test_status_and_report_name_a_torn_line_in_one_line(tmp_path):
    """The torn-line warning reaches the user as one line naming the file and line (it was two
    lines: Python's warning format, then the source line of fitscale that read the file)."""
    root = Path(__file__).resolve().parents[2]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"event": "start", "step": 0, "time": 1}\n{"step": 1, "loss": 0.5, "time": 2}\n{"step": 2, "lo'
    )
    expected = [
        f"fitscale {{}}: warning: {run / 'metrics.jsonl'}:3: skipped a line that is not a whole metrics record "
        "(cut short by a crash?)"
    ]
    env = {**os.environ, "PYTHONPATH": str(root)}
    for command in (["status", str(run)], ["report", str(run), "--out", str(tmp_path / "out")]):
        result = subprocess.run(
            [sys.executable, "-m", "fitscale.cli", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines() == [expected[0].format(command[0])]
