"""What a run reports: JSONL lines, wandb, a progress bar or log lines (fitscale.train.loglines),
throughput and MFU, memory.

Numbers are computed where they are cheap (device-side sums that the trainer all-reduces once
per log step) and written by rank 0 only unless `log.all_ranks` is set. MFU divides the model's
own FLOP count (`fitscale.models.flops`, 2 FLOPs per multiply-add, training = 3x forward) by the
device's dense bf16 peak from `fitscale.hardware` or `log.peak_flops`.
"""

from __future__ import annotations

import math
import re
import resource
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fitscale.config.log import LogConfig
from fitscale.hardware import lookup_peak_flops
from fitscale.train.loglines import StepLine, console_wanted, log_event
from fitscale.train.records import METRICS_FILE, next_attempt, open_for_append, write_record

SECRET_KEY = re.compile(
    r"(api[_-]?key|token|secret|password|passwd|credential|auth|cookie|private[_-]?key)", re.I
)
SECRET_VALUE = re.compile(
    r"^([0-9a-f]{40}|hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{16,}|gh[pousr]_[A-Za-z0-9]{20,})$"
)
REDACTED = "<redacted>"


@dataclass
class StepStats:
    """One optimizer step's outcome: the loss summed over ranks (the mean per image), gradient norm
    before clipping, whether the step was skipped as non-finite, image and token counts (real and
    with padding), per-timestep-bucket loss sums and counts, and the token count of each image.
    """

    loss: float
    grad_norm: float
    skipped: bool
    images: int
    real_tokens: int
    tokens: int
    bucket_sums: torch.Tensor
    bucket_counts: torch.Tensor
    seqlens: list[int]
    repa_loss: float | None = None  # the step's mean alignment loss (train.repa), None when off
    terms: dict[str, float] | None = None  # ddpm: the step's mean `mse` and `vb` terms, None for flow


def peak_flops(device: torch.device | str | None = None, configured: float = 0.0) -> float | None:
    """Peak dense bf16 FLOP/s of one device: `configured` if set, else the table; None if unknown."""
    if configured > 0:
        return configured
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    return lookup_peak_flops(torch.cuda.get_device_name(device))


def mfu(flops_per_second: float, device: torch.device | str | None = None, peak: float = 0.0) -> float | None:
    """Model FLOPs utilisation of one device (0..1), or None when its peak is unknown (e.g. CPU)."""
    top = peak_flops(device, peak)
    return None if top is None else flops_per_second / top


def memory_stats(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak memory in GiB: the CUDA caching allocator's peaks, or the process's peak RSS on CPU."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        stats = torch.cuda.memory_stats(device)
        return {
            "mem/max_allocated_gib": stats.get("allocated_bytes.all.peak", 0) / 2**30,
            "mem/max_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / 2**30,
            "mem/alloc_retries": float(stats.get("num_alloc_retries", 0)),
        }
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"mem/max_rss_gib": kib / 2**20}


def scrub_secrets(value: Any) -> Any:
    """A copy of a config tree with anything that looks like a credential replaced by `<redacted>`."""
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_KEY.search(str(k)) else scrub_secrets(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_secrets(v) for v in value)
    if isinstance(value, str) and SECRET_VALUE.match(value):
        return REDACTED
    return value


def timestep_bucket_sums(
    per_image_loss: torch.Tensor, t: torch.Tensor, num_buckets: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket loss sums and image counts over equal-width bins of t in [0, 1] (device-side, all-reducible)."""
    index = torch.clamp((t.detach().float() * num_buckets).long(), 0, num_buckets - 1)
    sums = torch.zeros(num_buckets, device=t.device).index_add_(0, index, per_image_loss.detach().float())
    counts = torch.zeros(num_buckets, device=t.device).index_add_(0, index, torch.ones_like(sums[index]))
    return sums, counts


def timestep_bucket_metrics(sums: torch.Tensor, counts: torch.Tensor) -> dict[str, float]:
    """{"loss/t0.00-0.25": mean, ...} for the buckets that saw images."""
    n = sums.numel()
    out = {}
    for i, (total, count) in enumerate(zip(sums.tolist(), counts.tolist())):
        if count > 0:
            out[f"loss/t{i / n:.2f}-{(i + 1) / n:.2f}"] = total / count
    return out


class Throughput:
    """Images, real tokens, packing efficiency, FLOP/s and MFU per device over a logging window."""

    def __init__(self, world_size: int, device: torch.device | str | None = None, peak: float = 0.0):
        self.world_size = world_size
        self.peak = peak_flops(device, peak)
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.started = now
        self.images = self.real_tokens = self.tokens = 0
        self.flops = 0.0
        self.data_wait = 0.0

    def add_data_wait(self, seconds: float) -> None:
        """Time the training loop spent waiting for its next batch (part of the window)."""
        self.data_wait += seconds

    def update(self, images: int, real_tokens: int, tokens: int, flops: float) -> None:
        """Add one step's global counts (all ranks together) and its training FLOPs (3x forward)."""
        self.images += images
        self.real_tokens += real_tokens
        self.tokens += tokens
        self.flops += flops

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` of other work (a validation pass) out of the current window."""
        self.started += seconds

    def rates(self) -> dict[str, float]:
        """Rates since the last call, then start a new window."""
        now = time.perf_counter()
        seconds = max(now - self.started, 1e-9)
        out = {
            "perf/images_per_s": self.images / seconds,
            "perf/real_tokens_per_s": self.real_tokens / seconds,
            "perf/packing_efficiency": self.real_tokens / self.tokens if self.tokens else 0.0,
            "perf/tflops_per_device": self.flops / seconds / self.world_size / 1e12,
            "perf/data_wait_s": self.data_wait,
            "perf/data_wait_fraction": self.data_wait / seconds,
        }
        if self.peak is not None:
            out["perf/mfu"] = self.flops / seconds / self.world_size / self.peak
        self._reset(now)
        return out


def _plain(value: Any) -> Any:
    """JSON-ready scalar: tensors and NumPy numbers become floats/ints, NaN/inf become null."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if hasattr(value, "item") and not isinstance(value, (int, float, str, bool)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """JSONL + wandb + progress bar for one run; a no-op on ranks that do not log.

    `metrics.jsonl` is appended to, never truncated: every start first writes an
    `{"event": "start", "step": N, "attempt": A}` record (N = 0 for a fresh start, the resumed
    checkpoint's step otherwise; A counts the starts of the run folder), and readers reduce the
    file to the live branch (fitscale.train.records.live_branch). Each record is one whole line.
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: LogConfig,
        rank: int,
        *,
        total_steps: int | None = None,
        start_step: int = 0,
        config: dict[str, Any] | None = None,
        attempt: int | None = None,
    ):
        """`attempt` is recorded in the start record (default: counted from the file)."""
        self.cfg = cfg
        self.rank = rank
        self.run_dir = Path(run_dir)
        self.writes = rank == 0 or cfg.all_ranks
        self._file = None
        self._bar = None
        self._wandb_run = None
        self._step_line = None
        if not self.writes:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.jsonl:
            # Rank 0 always keeps the run's metrics.jsonl (status, report, attempts read it); others their own.
            name = METRICS_FILE if rank == 0 else f"metrics.rank{rank}.jsonl"
            if attempt is None:
                attempt = next_attempt(self.run_dir / name)
            self._file = open_for_append(self.run_dir / name)
            self.event("start", start_step, attempt=attempt)
        if rank == 0:
            self._bar = self._make_bar(total_steps, start_step)
            if console_wanted(cfg.console, self._bar is not None):
                self._step_line = StepLine(cfg.every, total_steps, start_step)
            if cfg.wandb != "disabled":
                self._wandb_run = self._init_wandb(scrub_secrets(config or {}))

    def _make_bar(self, total_steps: int | None, start_step: int):
        if self.cfg.progress_bar == "off" or (self.cfg.progress_bar == "auto" and not sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def _init_wandb(self, config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "log.wandb needs wandb: pip install 'fitscale[wandb]', or set log.wandb=disabled"
            ) from None
        id_file = self.run_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(
            project=self.cfg.wandb_project,
            entity=self.cfg.wandb_entity,
            name=self.cfg.wandb_name or self.run_dir.name,
            tags=list(self.cfg.wandb_tags),
            dir=str(self.run_dir),
            mode=self.cfg.wandb,
            id=run_id,
            resume="allow",
            config=config,
            # No metadata record: it stores sys.argv, where `--set` overrides may carry credentials;
            # the scrubbed config above is what describes the run.
            settings=wandb.Settings(console="off", x_disable_meta=True),
        )

    def event(self, name: str, step: int, **info: Any) -> None:
        """A non-metric record (start, resume, skipped step, checkpoint) in the JSONL file, and as a
        log line on rank 0 (fitscale.train.loglines)."""
        if self.rank == 0 and self.writes:
            log_event(name, step, **{k: _plain(v) for k, v in info.items()})
        if self._file is not None:
            record = {
                "event": name,
                "step": step,
                "time": time.time(),
                **{k: _plain(v) for k, v in info.items()},
            }
            write_record(self._file, record)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Write one record for `step` to every sink of this rank."""
        if not self.writes:
            return
        values = {k: _plain(v) for k, v in metrics.items()}
        if self._file is not None:
            write_record(self._file, {"step": step, "time": time.time(), **values})
        if self._wandb_run is not None:
            self._wandb_run.log({k: v for k, v in values.items() if v is not None}, step=step)
        if self._step_line is not None:
            self._step_line.maybe_write(step, values)
        if self._bar is not None:
            self.update_progress(step)
            shown = {
                k: v for k, v in values.items() if k in ("loss", "lr", "perf/images_per_s") and v is not None
            }
            self._bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def log_image(self, step: int, key: str, path: str | Path) -> None:
        """A picture file to wandb under `key` (when wandb is on for this rank)."""
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({key: wandb.Image(str(path))}, step=step)

    def update_progress(self, step: int) -> None:
        """Move the progress bar to `step` (cheap; call every step)."""
        if self._bar is not None and step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def close(self) -> None:
        """Close the progress bar, finish the wandb run and close metrics.jsonl (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        if self._file is not None:
            self._file.close()
            self._file = None
