"""Three ranks, where FSDP shards most of the tiny model's weights unevenly and the global batch
of 8 splits 3/3/2: a run saved by a signal that reaches one rank only, during validation, then
killed outright, resumes bit for bit like the uninterrupted run (a public torchtitan report: loss
drift after resume with uneven shards). Asynchronous saves with one-rank signals are proven at
the manager level (test_checkpoint_dist.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.train_runs import checkpoint_tensors, losses, run, write_digits_split

pytestmark = pytest.mark.slow

PAD = {"pad_to": 128}
COMMON = ["train.steps=4", "checkpoint.interval=0"]


def test_three_ranks_signalled_on_one_rank_then_killed_resume_bit_identically(tmp_path):
    from fitscale.models import build_model

    model = build_model("tiny")
    uneven = [name for name, p in model.named_parameters() if p.shape[0] % 3]
    assert len(uneven) >= len(list(model.parameters())) // 2, "most weights must shard unevenly on 3 ranks"

    reference = tmp_path / "reference"
    run(reference, 3, *COMMON, **PAD)

    interrupted = tmp_path / "interrupted"
    validation = [f"data.val_path={write_digits_split(tmp_path / 'val')}", "train.val_every=1"]
    # SIGUSR1 reaches rank 2 alone as step 1's validation starts: every rank saves step 1 (no
    # interval is set, so only the signal saves). Rank 0 is SIGKILLed right after step 2.
    run(
        interrupted,
        3,
        *COMMON,
        *validation,
        signal_at=1,
        signal_rank=2,
        send_signal="SIGUSR1",
        die_at=2,
        expect_kill=True,
        **PAD,
    )
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step-1"]
    # The resume from step 1 ends where the uninterrupted run did, bit for bit.
    run(interrupted, 3, *COMMON, *validation, history="history-resumed.json", **PAD)
    resumed = json.loads((interrupted / "history-resumed.json").read_text())
    assert [r["step"] for r in resumed] == [2, 3, 4]
    assert losses(interrupted, "history-resumed.json") == losses(reference)[1:]
    expected, actual = checkpoint_tensors(reference, 4), checkpoint_tensors(interrupted, 4)
    for section in ("model.", "optimizer.", "ema.", "rng."):
        assert any(key.startswith(section) for key in expected), section
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), f"{key} differs after the one-rank signal and the kill"
