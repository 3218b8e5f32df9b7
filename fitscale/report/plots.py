"""The PNGs of `fitscale report`: several runs overlaid (one colour each), a resumed run's restarts
marked (dotted vertical lines at the steps it resumed from).

- `loss.png`: training loss (raw, faint, and an exponential moving average) and the validation
  loss of the weights (solid markers) and the EMA (open markers), against steps and training FLOPs.
- `timesteps.png`: training loss per timestep bucket against steps, and the validation loss at
  each grid timestep of every run's last validation.
- `optim.png`: learning rate and gradient norm against steps.
- `throughput.png`: images/s, real tokens/s and MFU against steps and training FLOPs.
"""

from __future__ import annotations

import re
from pathlib import Path

from fitscale.plotting import pyplot
from fitscale.report.history import RunHistory

SMOOTHING = 0.9  # EMA factor of the smoothed training loss


def smooth(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = factor * average + (1 - factor) * value
        out.append(average / (1 - factor**i))
    return out


def _colours(plt, count: int) -> list:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [cycle[i % len(cycle)] for i in range(count)]


def _mark_restarts(axis, history: RunHistory, colour, against_flops: bool = False) -> None:
    flops = history.cumulative_flops() if against_flops else None
    for segment in history.segments[1:]:
        x = segment.start_step if flops is None else flops.get(segment.start_step)
        if x is not None:
            axis.axvline(x, color=colour, linestyle=":", linewidth=1)


def _x(history: RunHistory, steps: list[int], against_flops: bool) -> list[float]:
    if not against_flops:
        return steps
    flops = history.cumulative_flops()
    return [flops[s] for s in steps]


def _finish(fig, axes, path: Path) -> Path:
    for axis in axes:
        handles, _ = axis.get_legend_handles_labels()
        if handles:
            axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _has_flops(histories: list[RunHistory]) -> bool:
    return any(max(h.cumulative_flops().values(), default=0.0) > 0 for h in histories)


def plot_loss(plt, histories: list[RunHistory], path: Path) -> Path:
    """Training loss (raw and smoothed) and validation loss of the weights and the EMA against steps, and
    against training FLOPs when logged; restarts marked. Writes the PNG to `path` and returns it.
    """
    columns = [False, True] if _has_flops(histories) else [False]
    fig, axes = plt.subplots(1, len(columns), figsize=(6 * len(columns), 4.2), squeeze=False)
    for axis, against_flops in zip(axes[0], columns):
        for history, colour in zip(histories, _colours(plt, len(histories))):
            steps, losses = history.series("loss")
            x = _x(history, steps, against_flops)
            axis.plot(x, losses, color=colour, alpha=0.25, linewidth=0.8)
            axis.plot(x, smooth(losses), color=colour, label=f"{history.name} train (smoothed)")
            for key, marker, fill in (("val_loss", "o", colour), ("val_loss_ema", "s", "none")):
                steps, values = history.series(key)
                if values:
                    axis.plot(
                        _x(history, steps, against_flops), values, marker=marker, color=colour,
                        markerfacecolor=fill, linestyle="--", linewidth=1, label=f"{history.name} {key}",
                    )  # fmt: skip
            _mark_restarts(axis, history, colour, against_flops)
        axis.set_xlabel("training FLOPs" if against_flops else "step")
        axis.set_ylabel("loss")
        if against_flops:
            axis.set_xscale("log")
    axes[0][0].set_title("loss (dotted lines: restarts)")
    return _finish(fig, axes[0], path)


def _bucket_keys(histories: list[RunHistory], pattern: str) -> list[str]:
    keys = {k for h in histories for r in h.steps().values() for k in r if re.fullmatch(pattern, k)}
    return sorted(keys, key=lambda k: float(re.findall(r"[\d.]+", k)[0]))


def plot_timesteps(plt, histories: list[RunHistory], path: Path) -> Path:
    """Training loss per timestep bucket and validation loss per grid timestep, per run; the PNG at `path`."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    train_keys = _bucket_keys(histories, r"loss/t[\d.]+-[\d.]+")
    styles = ["-", "--", "-.", ":"]
    shades = plt.cm.viridis([i / max(1, len(train_keys) - 1) for i in range(len(train_keys))])
    for run_index, history in enumerate(histories):
        for key, shade in zip(train_keys, shades):
            steps, values = history.series(key)
            if values:
                label = f"{history.name} {key[len('loss/') :]}" if len(histories) > 1 else key[len("loss/") :]
                axes[0].plot(steps, smooth(values), color=shade, linestyle=styles[run_index % 4], label=label)
    axes[0].set_title("training loss per timestep bucket (smoothed)")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss")
    for history, colour in zip(histories, _colours(plt, len(histories))):
        for suffix, marker in (("", "o"), ("_ema", "s")):
            pattern = r"val_loss_t([\d.]+)" + suffix
            last = next(
                (
                    r
                    for r in reversed(list(history.steps().values()))
                    if any(re.fullmatch(pattern, k) for k in r)
                ),
                None,
            )
            if last is None:
                continue
            points = sorted(
                (float(re.fullmatch(pattern, k)[1]), v) for k, v in last.items() if re.fullmatch(pattern, k)
            )
            axes[1].plot(
                [t for t, _ in points], [v for _, v in points], marker=marker, color=colour,
                linestyle="-" if not suffix else "--", label=f"{history.name} step {last['step']}{suffix or ' raw'}",
            )  # fmt: skip
    axes[1].set_title("validation loss at each grid timestep (last validation)")
    axes[1].set_xlabel("t (1 = data)")
    axes[1].set_ylabel("loss")
    return _finish(fig, axes, path)


def plot_optim(plt, histories: list[RunHistory], path: Path) -> Path:
    """Learning rate and gradient norm (before clipping) against steps, restarts marked; the PNG at `path`."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for history, colour in zip(histories, _colours(plt, len(histories))):
        steps, lr = history.series("lr")
        axes[0].plot(steps, lr, color=colour, label=history.name)
        steps, norms = history.series("grad_norm")
        axes[1].plot(steps, norms, color=colour, alpha=0.3, linewidth=0.8)
        axes[1].plot(steps, smooth(norms), color=colour, label=f"{history.name} (smoothed)")
        for axis in axes:
            _mark_restarts(axis, history, colour)
    axes[0].set_title("learning rate")
    axes[1].set_title("gradient norm before clipping")
    for axis in axes:
        axis.set_xlabel("step")
    return _finish(fig, axes, path)


THROUGHPUT_KEYS = (
    ("perf/images_per_s", "images/s"),
    ("perf/real_tokens_per_s", "real tokens/s"),
    ("perf/mfu", "MFU"),
)


def plot_throughput(plt, histories: list[RunHistory], path: Path) -> Path:
    """Images/s, real tokens/s and MFU against steps (and training FLOPs when logged); the PNG at `path`."""
    columns = [False, True] if _has_flops(histories) else [False]
    fig, axes = plt.subplots(3, len(columns), figsize=(6 * len(columns), 9), squeeze=False)
    for row, (key, title) in enumerate(THROUGHPUT_KEYS):
        for column, against_flops in enumerate(columns):
            axis = axes[row][column]
            axis.set_ylabel(title)
            axis.set_xlabel("training FLOPs" if against_flops else "step")
            if not any(history.series(key)[1] for history in histories):
                axis.text(0.5, 0.5, "not logged (device peak unknown)", ha="center", transform=axis.transAxes)
                continue
            for history, colour in zip(histories, _colours(plt, len(histories))):
                steps, values = history.series(key)
                x = _x(history, steps, against_flops)
                axis.plot(x, values, color=colour, marker=".", label=history.name)
                _mark_restarts(axis, history, colour, against_flops)
            if against_flops:
                axis.set_xscale("log")
    return _finish(fig, [a for row in axes for a in row], path)


def write_plots(histories: list[RunHistory], out_dir: Path) -> list[Path]:
    """All report PNGs into `out_dir`; returns their paths."""

    plt = pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in (
        ("loss.png", plot_loss),
        ("timesteps.png", plot_timesteps),
        ("optim.png", plot_optim),
        ("throughput.png", plot_throughput),
    ):
        try:
            written.append(plot(plt, histories, out_dir / name))
        finally:
            plt.close("all")
    return written
