"""DeepSpeed ZeRO-2/3 drive the same model, loss and data as FSDP: real processes, gloo, the tiny model.

One module-scoped set of runs (single process, 2-rank FSDP, 2-rank ZeRO-3 with checkpoints at
steps 2 and 4) serves the agreement, export and resume tests. The FSDP and ZeRO-3 runs score a
held-out split every 2 steps (`train.val_every`), so the agreement and bit-identical resume tests
also check that validation through the engine leaves DeepSpeed's training as it was. Every run takes 2 micro-batches per
rank, so gradient accumulation is exercised; warmup and clipping at 0.5 (the gradient norms are
about 0.65) check that DeepSpeed steps with our schedule and clips like torch. Label dropout is
off: the model draws it from each rank's RNG stream, so it differs between splits by design.
Every run keeps an EMA (decay 0.5, so it lags the weights visibly): the ZeRO averages, exported
from their partitions and scored on the held-out split, are compared with FSDP2's, also after
resuming on 1 and 3 ranks.

Tolerances: the backends sum gradients in other orders (flat buffers, reduce-scatter or all-reduce,
1, 2, 3 or 4 ranks), so losses, gradient norms and weights differ by fp32 rounding that 4 steps
carry forward: at most 2.2e-7 relative (losses, norms) and 3e-8 absolute (weights) under the
default, AVX2 and AVX-512 kernels. Losses and norms at rel 1e-5 and weights at rtol 1e-5 / atol 1e-6
leave 40x and more over that, and stay far below what a wrong average, clip or shard does (1e-4 and
more). A resume on the same world size repeats the arithmetic and is compared exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.train_runs import (
    checkpoint_tensors,
    losses,
    metric_records,
    model_weights,
    run,
    write_digits_split,
)

pytestmark = pytest.mark.slow

COMMON = [
    "train.steps=4",
    "checkpoint.keep_last=0",
    "optim.ema.decay=0.5",  # far from the weights within 4 steps, so a wrong average shows
    "optim.schedule.warmup_steps=2",
    "train.grad_clip=0.5",
    "model.overrides.class_dropout_prob=0.0",
]
NO_CHECKPOINTS = ["checkpoint.interval=0", "checkpoint.save_at_end=false"]
ZERO3 = ["parallel.backend=deepspeed", "parallel.zero_stage=3", "checkpoint.interval=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("backends")
    paths = {name: root / name for name in ("single", "fsdp", "zero3")}
    validation = [f"data.val_path={write_digits_split(root / 'val')}", "train.val_every=2"]
    run(paths["single"], 1, *COMMON, *NO_CHECKPOINTS)
    run(paths["fsdp"], 2, *COMMON, *validation, "checkpoint.interval=2")
    run(paths["zero3"], 2, *COMMON, *ZERO3, *validation)
    return paths


def history(run_dir: Path, name: str = "history.json") -> list[float]:
    """Loss and gradient norm (before clipping) of every step, in order."""
    records = json.loads((run_dir / name).read_text())
    return [value for r in records for value in (r["loss"], r["grad_norm"])]


def test_single_process_fsdp_and_zero3_give_the_same_losses_and_grad_norms(runs):
    reference = history(runs["single"])
    assert len(reference) == 8
    for name in ("fsdp", "zero3"):
        assert history(runs[name]) == pytest.approx(reference, rel=1e-5), name


def test_zero3_scores_the_held_out_split_like_fsdp(runs):
    fsdp, zero3 = metric_records(runs["fsdp"]), metric_records(runs["zero3"])
    for step in (2, 4):
        assert zero3[step]["val_images"] == fsdp[step]["val_images"] == 12
        assert zero3[step]["val_loss"] == pytest.approx(fsdp[step]["val_loss"], rel=1e-5), step
    assert "val_loss" not in zero3[1] and "val_loss" not in zero3[3]


def test_zero3_scores_the_ema_on_the_held_out_split_like_fsdp(runs):
    fsdp, zero3 = metric_records(runs["fsdp"]), metric_records(runs["zero3"])
    for step in (2, 4):
        assert zero3[step]["val_loss_ema"] == pytest.approx(fsdp[step]["val_loss_ema"], rel=1e-5), step
        assert abs(zero3[step]["val_loss_ema"] - zero3[step]["val_loss"]) > 1e-4  # the average was swapped in


def exported(run_dir: Path, step: int, out: Path, ema: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from fitscale.checkpoint.export import export_checkpoint

    export_checkpoint(run_dir / "checkpoints" / f"step-{step}", out, ema=ema)
    return load_file(out)


def assert_ema_matches_fsdp(run_dir: Path, fsdp: Path, step: int, tmp_path: Path) -> None:
    ema = exported(run_dir, step, tmp_path / "ema.safetensors", ema=True)
    weights = exported(run_dir, step, tmp_path / "weights.safetensors", ema=False)
    expected = checkpoint_tensors(fsdp, step)
    assert ema.keys() == weights.keys()
    for name, tensor in ema.items():
        torch.testing.assert_close(tensor, expected[f"ema.params.{name}"], rtol=1e-5, atol=1e-6, msg=name)
    moved = weights["final_layer.linear.weight"] - ema["final_layer.linear.weight"]
    assert moved.abs().max() > 1e-4  # the average lags the weights


def test_zero3_ema_is_fsdps_and_exports_from_its_partitions(runs, tmp_path):
    assert_ema_matches_fsdp(runs["zero3"], runs["fsdp"], 4, tmp_path)


def test_zero2_gives_the_losses_and_ema_of_the_other_backends_also_resumed_on_one_rank(runs, tmp_path):
    zero2 = ["parallel.backend=deepspeed", "parallel.zero_stage=2", "checkpoint.interval=0"]
    run(tmp_path / "zero2", 2, *COMMON, *zero2, "train.steps=2")
    assert history(tmp_path / "zero2") == pytest.approx(history(runs["single"])[:4], rel=1e-5)
    assert_ema_matches_fsdp(tmp_path / "zero2", runs["fsdp"], 2, tmp_path)
    run(tmp_path / "zero2", 1, *COMMON, *zero2, history="history-resumed.json")  # 2 -> 1 rank, to step 4
    resumed = history(tmp_path / "zero2", "history-resumed.json")
    assert resumed == pytest.approx(history(runs["single"])[4:], rel=1e-5)
    assert_ema_matches_fsdp(tmp_path / "zero2", runs["fsdp"], 4, tmp_path / "step-4")


def test_zero3_weights_exported_from_its_partitions_match_fsdp(runs, tmp_path):
    from safetensors.torch import load_file

    from fitscale.checkpoint.export import export_checkpoint

    out = tmp_path / "zero3-step4.safetensors"
    info = export_checkpoint(runs["zero3"] / "checkpoints" / "step-4", out)
    exported = load_file(out)
    expected = model_weights(checkpoint_tensors(runs["fsdp"], 4))
    assert info["tensors"] == len(expected) and exported.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert exported["final_layer.linear.weight"].abs().max() > 0  # zero at initialisation: it trained


def deepspeed_tensors(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor of every rank's DeepSpeed files of `step` (weights and optimizer partitions)."""
    flat: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}", item)
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                walk(f"{prefix}.{index}", item)

    files = sorted((run_dir / "deepspeed" / f"step-{step}").glob("*.pt"))
    assert any("optim_states" in f.name for f in files), files
    for file in files:
        walk(file.name, torch.load(file, map_location="cpu", weights_only=False))
    return flat


def copy_step(source: Path, target: Path, step: int) -> None:
    for folder in ("checkpoints", "deepspeed"):
        shutil.copytree(source / folder / f"step-{step}", target / folder / f"step-{step}")


def test_zero3_killed_and_resumed_on_the_same_world_size_continues_bit_identically(runs, tmp_path):
    """Rank 0 is SIGKILLed right after step 3 (step 2 is the last checkpoint); the resumed run holds
    the weights, Adam state, EMA partitions, data position and RNG of the uninterrupted one."""
    resumed = tmp_path / "resumed"
    validation = [f"data.val_path={write_digits_split(tmp_path / 'val')}", "train.val_every=2"]
    run(resumed, 2, *COMMON, *ZERO3, *validation, die_at=3, expect_kill=True)
    assert (resumed / "deepspeed" / "step-2").is_dir() and not (resumed / "checkpoints" / "step-4").exists()
    run(resumed, 2, *COMMON, *ZERO3, *validation, history="history-resumed.json")
    assert losses(resumed, "history-resumed.json") == losses(runs["zero3"])[2:]
    expected, actual = deepspeed_tensors(runs["zero3"], 4), deepspeed_tensors(resumed, 4)
    assert any("exp_avg_sq" in key for key in expected), "no Adam state in the DeepSpeed files"
    assert any(key.startswith("ema-rank-1.pt.params.") for key in expected), "no EMA in the DeepSpeed files"
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), f"{key} differs after resuming"
    expected, actual = checkpoint_tensors(runs["zero3"], 4), checkpoint_tensors(resumed, 4)
    assert not any(key.startswith("model.") for key in expected)  # DeepSpeed's files hold the weights
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), f"{key} differs after resuming"


def test_zero3_resumed_from_an_earlier_step_moves_the_later_deepspeed_parts_aside(runs, tmp_path):
    """`train.resume=2` with a new learning rate: step 4's DCP part and DeepSpeed files are moved
    whole to `superseded/from-step-2-attempt-2/`, and the new branch writes its own step 4."""
    run_dir = tmp_path / "branch"
    shutil.copytree(runs["zero3"], run_dir)
    run(run_dir, 2, *COMMON, *ZERO3, "train.resume=2", "optim.lr=5e-4")
    for part in ("checkpoints", "deepspeed"):
        aside = run_dir / part / "superseded" / "from-step-2-attempt-2" / "step-4"
        original = runs["zero3"] / part / "step-4"
        files = sorted(p.relative_to(original) for p in original.rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(aside) for p in aside.rglob("*") if p.is_file())
        assert all((aside / name).read_bytes() == (original / name).read_bytes() for name in files), part
    old, new = deepspeed_tensors(runs["zero3"], 4), deepspeed_tensors(run_dir, 4)
    assert old.keys() == new.keys()
    assert any(not torch.equal(old[key], new[key]) for key in old), "step 4 was not trained again"


def test_zero3_save_replaces_the_deepspeed_part_of_a_step_that_was_never_published(runs, tmp_path):
    """A save killed after DeepSpeed's files but before step-4 was published (here: step-4's DCP part
    gone, a stray partition of a 4-rank attempt beside its files): the resumed run removes that
    part before writing its own step 4, which then loads on resume=auto."""
    run_dir = tmp_path / "unpublished"
    shutil.copytree(runs["zero3"], run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-4")
    stray = run_dir / "deepspeed" / "step-4" / "zero_pp_rank_3_mp_rank_00_optim_states.pt"
    stray.write_bytes(b"from another attempt")
    run(run_dir, 2, *COMMON, *ZERO3)
    assert not stray.exists()
    old, new = deepspeed_tensors(runs["zero3"], 4), deepspeed_tensors(run_dir, 4)
    assert old.keys() == new.keys() and all(torch.equal(old[key], new[key]) for key in old)


def test_zero3_resumes_on_three_ranks_with_its_ema(runs, tmp_path):
    """2 -> 3 ranks, where ZeRO-3 pads the last rank's partitions (2 -> 1: the ZeRO-2 test)."""
    resumed = tmp_path / "resumed"
    copy_step(runs["zero3"], resumed, 2)
    run(resumed, 3, *COMMON, *ZERO3, history="history-resumed.json")
    assert losses(resumed, "history-resumed.json") == pytest.approx(losses(runs["zero3"])[2:], rel=1e-5)
    assert_ema_matches_fsdp(resumed, runs["fsdp"], 4, tmp_path)


def test_zero3_checkpoint_with_another_zero_stage_is_refused_before_loading(runs):
    from fitscale.checkpoint.deepspeed import DeepSpeedResumeError, check_resumable

    folder = runs["zero3"] / "deepspeed" / "step-2"
    assert check_resumable(runs["zero3"], 2, world_size=3, zero_stage=3) == (folder, 2)
    message = (
        f"{folder} holds ZeRO-3 partitions of 2 ranks; this run has 2 ranks and ZeRO-2. DeepSpeed checkpoints "
        "resume with the ZeRO stage that wrote them (on any world size): rerun with parallel.zero_stage=3, or "
        f"consolidate the weights with `fitscale convert export {runs['zero3'] / 'checkpoints' / 'step-2'} "
        "--out OUT.safetensors` and start a new run with train.init_from=OUT.safetensors (optimizer state and "
        "data position start afresh)"
    )
    with pytest.raises(DeepSpeedResumeError) as error:
        check_resumable(runs["zero3"], 2, world_size=2, zero_stage=2)
    assert str(error.value) == message
    with pytest.raises(FileNotFoundError, match="was not written by the DeepSpeed backend"):
        check_resumable(runs["fsdp"], 4, world_size=2, zero_stage=3)


def test_checkpoints_initialise_a_run_of_the_other_backend_with_their_weights_and_ema(runs, tmp_path):
    """`train.init_from` of a checkpoint folder: ZeRO-3 -> FSDP2 (one process) and FSDP2 -> ZeRO-3
    (2 ranks); each new run saves its initial state as step 0, which must be the source's exactly."""
    from fitscale.checkpoint.deepspeed import read_deepspeed_weights

    zero3_step = runs["zero3"] / "checkpoints" / "step-4"
    run(tmp_path / "fsdp", 1, *COMMON, f"train.init_from={zero3_step}", save_initial=1)
    started = checkpoint_tensors(tmp_path / "fsdp", 0)
    for section, which in (("model", "model"), ("ema", "ema")):
        expected, actual = read_deepspeed_weights(runs["zero3"], 4, which), model_weights(started, section)
        assert expected.keys() == actual.keys(), section
        for name, tensor in expected.items():
            assert torch.equal(actual[name], tensor), f"{section}: {name}"

    run(tmp_path / "zero3", 2, *COMMON, *ZERO3, f"train.init_from={runs['fsdp']}", save_initial=1)
    source = checkpoint_tensors(runs["fsdp"], 4)  # the newest step of the run folder
    for section, which in (("model", "model"), ("ema", "ema")):
        expected, actual = (
            model_weights(source, section),
            read_deepspeed_weights(tmp_path / "zero3", 0, which),
        )
        assert expected.keys() == actual.keys(), section
        for name, tensor in expected.items():
            assert torch.equal(actual[name], tensor), f"{section}: {name}"
    assert not torch.equal(
        model_weights(source)["final_layer.linear.weight"],
        model_weights(source, "ema")["final_layer.linear.weight"],
    )  # weights and EMA differ, so each went to its own place


def test_paper_recipe_trains_on_deepspeed_with_its_parallelism_unchanged(tmp_path):
    """fitv2_3b_256 (HSDP, activation checkpointing of every 2nd block, compiled blocks, bf16) with
    `parallel.backend=deepspeed` and only the model shrunk, the data, device and run length made
    local: 2 ranks, ZeRO-3, blocks compiled before DeepSpeed wraps the model (before the ZeRO-3
    leaf-block hooks kept them free of recompiles, this run hit torch.compile's recompile limit)."""
    import os
    import subprocess
    import sys

    small = dict(depth=2, hidden_size=64, num_heads=4, num_classes=10, attn_backend="reference")
    overrides = [
        "parallel.backend=deepspeed",
        "parallel.shard_size=2",  # the recipe's node of 8 GPUs is this machine's 2 processes
        *(f"model.overrides.{key}={value}" for key, value in small.items()),
        f"data.path={write_digits_split(tmp_path / 'digits', images=16)}",
        "data.val_path=null",
        "train.val_every=0",
        "data.num_classes=10",
        "data.global_batch_size=2",  # one image per rank: the same shapes every step, one compile
        "data.token_budget=256",
        "data.num_workers=0",
        "data.pin_memory=false",
        f"train.run_dir={tmp_path / 'run'}",
        "train.steps=2",
        "train.device=cpu",
        "checkpoint.async_save=false",
        "log.wandb=disabled",
        "log.every=1",
        "launch.cluster=local",
    ]
    command = [sys.executable, "-m", "fitscale.cli", "train", "recipes/fitv2_3b_256.yaml", "--nproc", "2"]
    result = subprocess.run(
        [*command, "--set", *overrides],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=600,  # inductor compiles each rank's blocks on the CPU first
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    records = metric_records(tmp_path / "run")
    assert sorted(records) == [1, 2] and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in records.values())
    saved = json.loads((tmp_path / "run" / "deepspeed" / "step-2" / "fitscale.json").read_text())
    assert (saved["world_size"], saved["zero_stage"]) == (2, 3)


def test_zero3_hybrid_sharding_as_hpz_on_two_groups_gives_the_losses_of_one_process(runs, tmp_path):
    """`parallel.sharding=hybrid` with ZeRO-3 is ZeRO++ hpZ: 4 ranks in 2 groups of 2 (a secondary
    copy of the weights partitioned within each group, used by backward's all-gathers)."""
    hybrid = ["parallel.sharding=hybrid", "parallel.shard_size=2", "train.steps=2"]
    run(
        tmp_path / "hpz", 4, *COMMON, *ZERO3, *hybrid, "checkpoint.interval=0", "checkpoint.save_at_end=false"
    )
    assert history(tmp_path / "hpz") == pytest.approx(history(runs["single"])[:4], rel=1e-5)
