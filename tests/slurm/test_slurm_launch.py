"""`fitscale launch` on a real SLURM cluster: rendezvous, a full run, preemption, time limits, failures.

The runs share one config, so the uninterrupted run is the reference every interrupted one must
match bit for bit. Tests run in file order: the reference first.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from slurm_runs import (
    RUN_STEPS,
    assert_same_weights,
    final_model_state,
    fitscale_launch,
    held_until_signalled,
    job_logs,
    metric_steps,
    run_overrides,
    scontrol_job,
    start_steps,
    wait_until,
)

from fitscale.config.launch import LaunchConfig, resolve_resources
from fitscale.launch.profiles import load_profile
from fitscale.launch.slurm import build_executor, sbatch_parameters, submit_array, wait_for_job
from fitscale.runtime.env import allreduce_check, master_port_for_job

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def submit(*args: str, env: dict | None = None) -> dict:
    result = fitscale_launch(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_two_task_job_joins_gloo_and_all_reduces(slurm_cluster, tmp_path):
    profile = load_profile("local-slurm")
    launch = LaunchConfig(cluster="local-slurm", time_min=2, signal_delay_s=10)
    params = sbatch_parameters(profile, launch, resolve_resources(launch, profile), "fitscale-allreduce")
    executor = build_executor(tmp_path, params, max_timeout_requeues=0)
    job = executor.submit(allreduce_check)
    outcome = wait_for_job(job.job_id, tmp_path, poll_s=0.5, timeout_s=300)
    assert outcome.state == "COMPLETED", outcome.reason
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    for result in results:
        assert result["source"] == "slurm"
        assert result["world_size"] == 2
        assert result["sum"] == 3.0  # 1 + 2
        assert result["master"].endswith(f":{master_port_for_job(job.job_id)}")


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, synth_data, tmp_path_factory):
    """The uninterrupted 2-task run, submitted like a user would, followed to its end."""
    run_dir = tmp_path_factory.mktemp("runs") / "reference"
    result = fitscale_launch(
        "recipes/demo.yaml",
        "--cluster",
        "local-slurm",
        *run_overrides(synth_data, run_dir),
        "--wait",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    return run_dir, json.loads(result.stdout)


def test_demo_job_completes_with_metrics_and_checkpoints_in_the_run_folder(reference_run):
    run_dir, report = reference_run
    assert report["state"] == "COMPLETED"
    assert report["result"]["step"] == RUN_STEPS
    assert report["world_size"] == 2
    job_id = report["job_id"]
    # The layout docs/cluster.md describes.
    assert metric_steps(run_dir) == list(range(1, RUN_STEPS + 1))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-36", "step-48"]
    assert (run_dir / "config.yaml").is_file()
    record = json.loads((run_dir / "launch.jsonl").read_text().splitlines()[-1])
    assert record["job_id"] == job_id and record["cluster"] == "local-slurm"
    for task in (0, 1):
        assert (run_dir / "slurm" / f"{job_id}_{task}_log.err").is_file()
    assert "rank 1 of 2" in (run_dir / "slurm" / f"{job_id}_1_log.err").read_text()


def test_scontrol_requeue_mid_run_resumes_to_identical_weights(reference_run, synth_data, tmp_path):
    run_dir = tmp_path / "requeued"
    job_id = submit("recipes/demo.yaml", "--cluster", "local-slurm", *run_overrides(synth_data, run_dir))[
        "job_id"
    ]
    wait_until(lambda: len(metric_steps(run_dir)) >= 3, 300, "the run to take 3 steps")
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    outcome = wait_for_job(job_id, run_dir / "slurm", poll_s=0.5, timeout_s=400)
    assert outcome.state == "COMPLETED", outcome.reason
    assert int(scontrol_job(job_id)["Restarts"]) == 1
    starts = start_steps(run_dir)
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < RUN_STEPS, f"not resumed mid-run: {starts}"
    assert "on SIGTERM" in job_logs(run_dir, job_id)
    assert_same_weights(final_model_state(run_dir, tmp_path), final_model_state(reference_run[0], tmp_path))


def test_time_limit_checkpoints_requeues_and_resumes_to_identical_weights(
    reference_run, synth_data, tmp_path
):
    run_dir = tmp_path / "timed"
    # A 1-minute limit; SLURM warns with SIGUSR2 5-35 s into the job (25 s before the limit, and its
    # controller checks every 30 s). The first attempt takes 2 steps and then waits for a signal
    # (held_job/sitecustomize.py), so it cannot finish before the warning on any machine.
    job_id = submit(
        "recipes/demo.yaml", "--cluster", "local-slurm", "--time", "1",
        *run_overrides(synth_data, run_dir, "launch.signal_delay_s=25", "launch.max_timeout_requeues=2"),
        env=held_until_signalled(step=2),
    )["job_id"]  # fmt: skip
    wait_until(lambda: int(scontrol_job(job_id)["Restarts"]) >= 1, 300, "the time-limit requeue", poll=0.5)
    # Once the limit has been hit and handled, give the next attempt room to finish, so that the test
    # does not depend on how many 1-minute attempts this machine needs.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)
    outcome = wait_for_job(job_id, run_dir / "slurm", poll_s=0.5, timeout_s=400)
    assert outcome.state == "COMPLETED", outcome.reason
    logs = job_logs(run_dir, job_id)
    assert "on SIGUSR2" in logs and f"Requeued job {job_id} (1 remaining timeouts)" in logs, logs[-6000:]
    starts = start_steps(run_dir)
    # Stopped at the step boundary after the warning: during start-up or the first 2 steps, or held at 2.
    assert len(starts) >= 2 and starts[0] == 0 and 0 < starts[1] <= 3, starts
    assert all(0 < step < RUN_STEPS for step in starts[1:]), starts
    assert_same_weights(final_model_state(run_dir, tmp_path), final_model_state(reference_run[0], tmp_path))


def test_time_limit_with_no_requeues_left_ends_the_run_with_its_checkpoint(
    slurm_cluster, synth_data, tmp_path
):
    run_dir = tmp_path / "no-requeues"
    result = fitscale_launch(
        "recipes/demo.yaml", "--cluster", "local-slurm", "--time", "1",
        *run_overrides(synth_data, run_dir, "launch.signal_delay_s=25", "launch.max_timeout_requeues=0"),
        "--wait",
        env=held_until_signalled(step=2),
    )  # fmt: skip
    assert result.returncode == 1
    report = result.stderr.strip().splitlines()[-1]
    assert " FAILED: task 0: " in report and "Job not requeued because: timed-out too many times." in report
    job_id = report.split()[3]
    assert int(scontrol_job(job_id)["Restarts"]) == 0
    stopped = [int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")]
    assert stopped and max(stopped) <= 3  # the work up to the warning is kept


def test_a_missing_dataset_is_refused_before_submitting(slurm_cluster, tmp_path):
    run_dir = tmp_path / "broken"
    missing = tmp_path / "no-such-dataset"
    result = fitscale_launch(
        "recipes/demo.yaml", "--cluster", "local-slurm", "--set", f"data.path={missing}",
        f"train.run_dir={run_dir}", "--wait",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fitscale launch: error: data.path={missing} holds no dataset (no fitscale.json); write one with "
        "`fitscale data ...` or point data.path at a dataset folder"
    ]
    assert not run_dir.exists()


def test_second_launch_on_a_live_run_folder_is_refused(slurm_cluster, synth_data, tmp_path):
    run_dir = tmp_path / "busy"
    first = submit("recipes/demo.yaml", "--cluster", "local-slurm", *run_overrides(synth_data, run_dir))[
        "job_id"
    ]
    try:
        second = fitscale_launch(
            "recipes/demo.yaml", "--cluster", "local-slurm", *run_overrides(synth_data, run_dir)
        )
        assert second.returncode == 2
        assert f"already has SLURM job {first}" in second.stderr
    finally:
        subprocess.run(["scancel", first], check=False)
    assert len(Path(run_dir / "launch.jsonl").read_text().splitlines()) == 1


def test_job_array_runs_every_element(slurm_cluster, tmp_path):
    profile = load_profile("local-slurm")
    launch = LaunchConfig(cluster="local-slurm", tasks_per_node=1, time_min=5, signal_delay_s=10)
    params = sbatch_parameters(profile, launch, resolve_resources(launch, profile), "fitscale-array")
    executor = build_executor(tmp_path, params, max_timeout_requeues=0)
    jobs = submit_array(executor, [allreduce_check, allreduce_check])
    array_id = jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in jobs] == [f"{array_id}_0", f"{array_id}_1"]
    for job in jobs:
        outcome = wait_for_job(job.job_id, tmp_path, poll_s=0.5, timeout_s=300)
        assert outcome.state == "COMPLETED", outcome.reason
        assert outcome.result["world_size"] == 1 and outcome.result["source"] == "slurm"


def test_sbatch_refusal_is_reported_in_one_line(slurm_cluster, synth_data, tmp_path):
    result = fitscale_launch(
        "recipes/demo.yaml", "--cluster", "local-slurm",
        *run_overrides(synth_data, tmp_path / "refused", "launch.sbatch.partition=no-such-partition"),
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "fitscale launch: error: sbatch refused the job: sbatch: error: invalid partition specified: no-such-partition"
        )
    )
    assert not (tmp_path / "refused" / "launch.jsonl").exists()
