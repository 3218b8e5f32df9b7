"""A training process for the integration tests: the real Trainer on deterministic packed data.

Run under `python -m torch.distributed.run --nproc_per_node N train_worker.py RUN_DIR [options]`
(or directly for one process). The data is a small, seeded, world-size-independent stream of
packed steps: step s holds the images with sample ids s*B ... s*B+B-1, each of a grid and
content derived from its id, so any split over ranks and micro-batches is the same global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from fitscale.clitools import add_set_option
from fitscale.config import load_config
from fitscale.data.batch import pack_images
from fitscale.runtime.env import leave_process_group
from fitscale.train.trainer import Trainer


@dataclass
class StepBatch:
    micro_batches: list
    global_num_images: int | None


class SeededSteps:
    """Deterministic global batches split over ranks by `split`:
    `interleave` (image i to rank i % W), `contiguous` (rank 0 takes the first `first` images).
    Steps in `nan_steps` (0-based) carry a NaN image; `pad_to` pads micro-batches to static shapes."""

    def __init__(
        self,
        rank,
        world_size,
        global_batch,
        micro_batches,
        num_classes,
        split="interleave",
        first=0,
        nan_steps=(),
        pad_to=None,
    ):
        self.rank, self.world_size = rank, world_size
        self.global_batch, self.micro_batches = global_batch, micro_batches
        self.num_classes, self.split, self.first = num_classes, split, first
        self.nan_steps, self.pad_to = set(nan_steps), pad_to
        self.step = 0

    def image(self, sample_id: int):
        generator = torch.Generator().manual_seed(10_000 + sample_id)
        rows, cols = (int(v) for v in torch.randint(2, 6, (2,), generator=generator))
        tokens = torch.randn(rows * cols, 16, generator=generator)
        label = int(torch.randint(0, self.num_classes, (1,), generator=generator))
        return tokens, (rows, cols), label

    def my_ids(self, step: int) -> list[int]:
        ids = list(range(step * self.global_batch, (step + 1) * self.global_batch))
        if self.split == "interleave":
            return ids[self.rank :: self.world_size]
        if self.world_size == 1:
            return ids
        cut = self.first or len(ids) // self.world_size
        return ids[:cut] if self.rank == 0 else ids[cut:][self.rank - 1 :: self.world_size - 1]

    def batch(self, step: int) -> StepBatch:
        ids = self.my_ids(step)
        chunks = [ids[i :: self.micro_batches] for i in range(self.micro_batches)]
        micro = []
        for chunk in chunks:
            images, grids, labels = zip(*(self.image(i) for i in chunk))
            if step in self.nan_steps:  # a corrupt step: every rank's first image turns NaN
                images = (torch.full_like(images[0], float("nan")), *images[1:])
            micro.append(
                pack_images(
                    list(images), list(grids), list(labels), chunk, self.pad_to, null_class=self.num_classes
                )
            )
        return StepBatch(micro, self.global_batch)

    def __iter__(self):
        while True:
            batch = self.batch(self.step)
            self.step += 1
            yield batch

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = int(state["step"])


def worker_config(run_dir: str | Path) -> list[str]:
    """The config overrides every worker run starts from, before its own `--set` items."""
    return [
        f"train.run_dir={run_dir}",
        "data.path=unused",
        "data.num_classes=10",
        "model.name=tiny",
        "model.overrides.attn_backend=reference",
        "train.device=cpu",
        "optim.lr=1e-3",
    ]


class KillingTrainer(Trainer):
    """Rank 0 SIGKILLs itself right after step `die_at` (its checkpoint, if due, is written);
    rank `signal_rank` alone sends itself `signal_name` as the validation of step `signal_at` starts."""

    die_at: int | None = None
    signal_at: int | None = None
    signal_rank: int = 0
    signal_name: str = "SIGTERM"

    def maybe_validate(self):
        if self.progress.step == self.signal_at and self.env.rank == self.signal_rank:
            assert self.validation is not None and self.validation.due(self.progress.step), (
                "no validation here"
            )
            os.kill(os.getpid(), getattr(signal, self.signal_name))
        return super().maybe_validate()

    def maybe_save(self, force: bool = False) -> bool:
        saved = super().maybe_save(force)
        if self.die_at is not None and self.progress.step == self.die_at and self.env.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        return saved


def poison_gradients(trainer: Trainer, steps: set[int]) -> None:
    """At the (0-based) optimizer steps `steps`, this rank's backward through the final layer turns
    NaN: every upstream gradient is NaN, the loss (a forward value) stays finite."""

    def hook(module, inputs, output):
        if trainer.progress.step in steps and output.requires_grad:
            output.register_hook(lambda grad: torch.full_like(grad, float("nan")))

    trainer.backend.model.final_layer.register_forward_hook(hook)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    add_set_option(parser, "config fields", "train.steps=3")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--split", default="interleave")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--history", default="history.json")
    parser.add_argument("--nan-steps", default="", help="comma-separated 0-based steps with a NaN image")
    parser.add_argument(
        "--nan-grad-steps", default="", help="comma-separated 0-based steps whose gradient rank 0 turns NaN"
    )
    parser.add_argument("--pad-to", type=int, default=None, help="pad every micro-batch to this many tokens")
    parser.add_argument("--signal-at", type=int, default=None, help="step whose validation gets the signal")
    parser.add_argument("--signal-rank", type=int, default=0, help="the one rank that is signalled")
    parser.add_argument("--send-signal", default="SIGTERM", help="the signal's name")
    parser.add_argument(
        "--save-initial", type=int, default=0, help="1: checkpoint the initial state as step 0, then stop"
    )
    args = parser.parse_args()
    config = load_config(None, [*worker_config(args.run_dir), *args.overrides])
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    loader = SeededSteps(
        rank,
        world_size,
        args.global_batch,
        args.micro_batches,
        10,
        split=args.split,
        first=args.first,
        nan_steps=[int(s) for s in args.nan_steps.split(",") if s],
        pad_to=args.pad_to,
    )
    KillingTrainer.die_at = args.die_at
    KillingTrainer.signal_at, KillingTrainer.signal_rank = args.signal_at, args.signal_rank
    KillingTrainer.signal_name = args.send_signal
    trainer = KillingTrainer(config, loader=loader)
    nan_grad_steps = {int(s) for s in args.nan_grad_steps.split(",") if s}
    if nan_grad_steps and rank == 0:
        poison_gradients(trainer, nan_grad_steps)
    if args.save_initial:
        trainer.maybe_save(force=True)
        trainer.checkpoints.wait()
        trainer.close()
        leave_process_group()
        return
    trainer.train()
    if rank == 0:
        Path(args.run_dir, args.history).write_text(json.dumps(list(trainer.history)))
    leave_process_group()


if __name__ == "__main__":
    main()
