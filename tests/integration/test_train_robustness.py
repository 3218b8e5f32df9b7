"""What a run does when things go wrong or start unusually: non-finite steps, a busy run folder,
weights from a released checkpoint with most of them frozen, and wandb without leaking secrets.

Real processes (torchrun, gloo, FSDP2) on the tiny model for a couple of steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers.train_runs import BASE, checkpoint_tensors, launch_command, metric_records, model_weights, run
from helpers.train_worker import SeededSteps, worker_config

from fitscale.config import load_config
from fitscale.train.trainer import Trainer

pytestmark = pytest.mark.slow

HOLD_LOCK = (
    "import sys; from fitscale.train.state import RunLock; RunLock(sys.argv[1]).acquire(); "
    "print('locked', flush=True); sys.stdin.read()"
)


def test_nonfinite_steps_are_skipped_and_a_run_of_them_stops_the_job(tmp_path):
    run_dir = tmp_path / "run"
    result = run(
        run_dir,
        2,
        "train.steps=8",
        "checkpoint.interval=1",
        "checkpoint.keep_last=0",
        "train.max_nonfinite_steps=2",
        nan_steps="2,4,5",  # optimizer steps 3, 5 and 6
        expect_kill=True,
    )
    assert "2 consecutive steps had a non-finite loss or gradient (last at step 6)" in result.stderr
    records = metric_records(run_dir)
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert [step for step, record in sorted(records.items()) if record["skipped"]] == [3, 5, 6]
    assert [records[step]["nonfinite_total"] for step in (2, 3, 5, 6)] == [0, 1, 2, 3]
    assert records[3]["loss"] is None and records[4]["loss"] > 0
    # The stop wrote nothing: checkpoints 1..5 complete, no step 6, no half-written folder.
    entries = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert entries == [f"step-{step}" for step in range(1, 6)]
    kept = ("model.", "optimizer.", "ema.")
    before, skipped, after, last = (checkpoint_tensors(run_dir, step) for step in (2, 3, 4, 5))
    for key, tensor in before.items():
        if key.startswith(kept):
            assert torch.equal(tensor, skipped[key]), f"{key} changed in a skipped step"
    assert int(skipped["progress.nonfinite_total"]) == 1
    weights_4, weights_5 = model_weights(after), model_weights(last)
    assert any(not torch.equal(weights_4[k], v) for k, v in model_weights(skipped).items()), "no step after 3"
    assert all(torch.equal(weights_5[k], v) for k, v in weights_4.items()), "skipped step 5 changed weights"


@pytest.mark.parametrize("backend", ["fsdp", "zero2", "zero3"])
def test_a_nan_gradient_with_a_finite_loss_is_skipped_under_both_backends(tmp_path, backend):
    """Rank 0's backward turns NaN at optimizer step 2 (0-based): the loss stays finite, the global
    gradient norm does not, and the step changes neither weights nor optimizer state nor EMA."""
    from fitscale.checkpoint.deepspeed import read_deepspeed_weights

    run_dir = tmp_path / backend
    zero = {"zero2": ["parallel.zero_stage=2"], "zero3": ["parallel.zero_stage=3"]}
    chosen = ["parallel.backend=deepspeed", *zero[backend]] if backend in zero else []
    run(
        run_dir,
        2,
        "train.steps=4",
        "checkpoint.interval=1",
        "checkpoint.keep_last=0",
        *chosen,
        nan_grad_steps="2",
    )
    records = metric_records(run_dir)
    assert [step for step, record in sorted(records.items()) if record["skipped"]] == [3]
    assert records[3]["nonfinite_total"] == 1 and records[4]["nonfinite_total"] == 1
    assert (
        records[3]["loss"] is not None and records[3]["loss"] > 0
    )  # a finite loss: only the gradient was NaN
    if backend in zero:  # weights and EMA are in DeepSpeed's own files
        states = [
            {**read_deepspeed_weights(run_dir, step), **read_deepspeed_weights(run_dir, step, "ema")}
            for step in (2, 3, 4)
        ]
    else:
        kept = ("model.", "optimizer.", "ema.")
        states = [
            {k: v for k, v in checkpoint_tensors(run_dir, step).items() if k.startswith(kept)}
            for step in (2, 3, 4)
        ]
    before, skipped, after = states
    assert before.keys() == skipped.keys() and before
    for key, tensor in before.items():
        assert torch.equal(tensor, skipped[key]), f"{key} changed in the skipped step"
    assert any(not torch.equal(after[k], v) for k, v in skipped.items()), "no step after the skipped one"


def test_a_live_run_folder_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        # The CLI refuses before starting any process: one line, exit 2, nothing written.
        cli = subprocess.run(
            [sys.executable, "-m", "fitscale.cli", "train", "recipes/demo.yaml"]
            + ["--set", f"train.run_dir={run_dir}", "data.path=unused"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 2
        lines = cli.stderr.strip().splitlines()
        assert len(lines) == 1, cli.stderr
        assert f"run folder {str(run_dir)!r} is in use by a live run" in lines[0]
        assert f'"pid": {holder.pid}' in lines[0] and "choose another train.run_dir" in lines[0]
        # Ranks started by a launcher refuse together (rank 0 holds the lock, the others must not hang).
        ranks = run(run_dir, 2, "train.steps=1", expect_kill=True)
        assert "is in use by a live run" in ranks.stderr
        assert sorted(path.name for path in run_dir.iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    # The holder died without cleaning up: its lock file remains, and the next run takes it over.
    assert json.loads((run_dir / ".lock").read_text())["pid"] == holder.pid
    run(run_dir, 1, "train.steps=1", "checkpoint.save_at_end=false")
    assert json.loads((run_dir / ".lock").read_text())["pid"] != holder.pid
    assert (run_dir / "history.json").is_file()


def test_init_from_a_released_checkpoint_trains_only_the_chosen_set(tmp_path):
    from safetensors.torch import save_file

    from fitscale.models import build_model
    from fitscale.models.official import export_official_state_dict
    from fitscale.models.partial import trainable_names

    torch.manual_seed(1234)  # not the run's seed: frozen weights can only come from the file
    released_model = build_model("tiny", attn_backend="reference")
    released = export_official_state_dict(released_model)
    path = tmp_path / "released.safetensors"
    save_file(released, str(path))
    run_dir = tmp_path / "run"
    run(
        run_dir,
        2,
        "train.steps=2",
        "checkpoint.interval=0",
        f"train.init_from={path}",
        "train.trainable=[high-res]",
    )
    tensors = checkpoint_tensors(run_dir, 2)
    weights, ema = model_weights(tensors), model_weights(tensors, "ema")
    trainable = set(trainable_names(released_model, "high-res"))
    parameters = {name for name, _ in released_model.named_parameters()}
    assert trainable and parameters - trainable
    for name in sorted(parameters - trainable):
        assert torch.equal(weights[name], released[name]), f"frozen {name} changed"
        assert torch.equal(ema[name], released[name]), f"the EMA of frozen {name} drifted"
    trained = {name for name in trainable if not torch.equal(weights[name], released[name])}
    assert {"x_embedder.proj.weight", "final_layer.linear.weight"} <= trained, sorted(trained)
    with_moments = {
        key[len("optimizer.state.") :].rsplit(".", 1)[0]
        for key in tensors
        if key.startswith("optimizer.state.")
    }
    assert with_moments == trainable, "the optimizer must hold state for the trainable parameters only"


def test_wandb_offline_writes_its_files_and_no_secret(tmp_path):
    api_key = "0123456789abcdef0123456789abcdef01234567"
    token = "tok-" + "7" * 24
    looks_like_a_key = "hf_" + "A1b2" * 8
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_API_KEY": api_key, "WANDB_SILENT": "true"}
    run_dir = tmp_path / "run"
    command = launch_command(
        run_dir,
        1,
        "train.steps=2",
        "checkpoint.interval=0",
        "checkpoint.save_at_end=false",
        "log.wandb=offline",
        f"launch.sbatch.auth_token={token}",
        f"launch.sbatch.comment={looks_like_a_key}",
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, sorted(p.name for p in (run_dir / "wandb").iterdir())
    assert list(runs[0].glob("run-*.wandb")), "no offline run file"
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    logged = [path for path in (run_dir / "wandb").rglob("*") if path.is_file()] + [run_dir / "metrics.jsonl"]
    for path in logged:
        data = path.read_bytes()
        for secret in (api_key, token, looks_like_a_key):
            assert secret.encode() not in data, f"{secret[:6]}... leaked into {path}"


@pytest.mark.parametrize(
    "failure",
    [
        ["train.val_every=2", "data.val_path=no-such-split"],  # fails building the validation split
        ["train.trainable=[no.such.*]"],  # fails while building the model
        ["train.init_from=no-such-weights.safetensors"],  # fails loading the initial weights
    ],
)
def test_a_failed_trainer_construction_releases_the_run_folder(tmp_path, failure):
    base = [*worker_config(tmp_path / "run"), *BASE, "train.steps=1"]
    with pytest.raises((ValueError, FileNotFoundError)):
        Trainer(load_config(None, [*base, *failure]), loader=SeededSteps(0, 1, 4, 1, 10))
    # The same process retries with the mistake fixed: the run folder is free, the run trains.
    trainer = Trainer(load_config(None, base), loader=SeededSteps(0, 1, 4, 1, 10))
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    assert trainer.train() == 1


def test_the_in_memory_history_keeps_a_window_of_the_newest_steps(tmp_path):
    class ShortHistory(Trainer):
        HISTORY_STEPS = 3

    run_dir = tmp_path / "run"
    overrides = [*worker_config(run_dir), "log.wandb=disabled", "train.steps=5", "log.every=2"]
    overrides += ["checkpoint.interval=0", "checkpoint.save_at_end=false"]
    trainer = ShortHistory(load_config(None, overrides), loader=SeededSteps(0, 1, 4, 1, 10))
    assert trainer.train() == 5
    assert [record["step"] for record in trainer.history] == [3, 4, 5]
    logged = metric_records(run_dir)
    for record in trainer.history:
        assert (
            record["loss"] == logged[record["step"]]["loss"] and record["lr"] == logged[record["step"]]["lr"]
        )
