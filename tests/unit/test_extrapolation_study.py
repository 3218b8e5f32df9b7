"""tools/extrapolation_study.py on a random-weight run: the table's shape, cells sampled once per
distinct RoPE table, the spread between seeds, and bad arguments as one-line errors."""

from __future__ import annotations

import dataclasses
import json

import extrapolation_study
import numpy as np
import pytest
import torch

from fitscale.models import build_model
from fitscale.sample.generate import generate_latents, load_sampling_model
from fitscale.sample.options import SamplingOptions
from fitscale.sample.plan import SampleItem


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as training leaves it: config.yaml with a demo section and a DCP checkpoint."""
    from fitscale.checkpoint import CheckpointManager, ModelState
    from fitscale.config.checkpoint import CheckpointConfig
    from fitscale.config.optim import EMAConfig
    from fitscale.parallel.ema import EMA

    torch.manual_seed(0)
    model = build_model("tiny", attn_backend="reference")
    with torch.no_grad():
        for param in model.parameters():  # the released init zeroes the output layer
            param.add_(torch.randn_like(param) * 0.05)
    run = tmp_path_factory.mktemp("run")
    state = {"model": ModelState(model), "ema": EMA(model, EMAConfig())}  # sampled: the EMA, = the weights
    CheckpointManager(run, CheckpointConfig(), handle_signals=False).save(1, state)
    (run / "config.yaml").write_text(
        "model:\n  name: tiny\n  overrides:\n    attn_backend: reference\n"
        "hooks:\n  options:\n    digits_max_side: 2\n    sample_cfg_scale: 2.0\n"
    )
    return run


def study(run_dir, out, *extra):
    argv = ["--run", str(run_dir), "--out", str(out), "--methods", "none,yarn", "--sizes", "2x2,4x2"]
    return extrapolation_study.main([*argv, "--per-class", "1", "--steps", "1", *extra])


def test_table_of_every_variant_and_size_and_the_spread_between_seeds(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert study(run_dir, out, "--seed", "0") == 0
    first = json.loads((out / "recognition-seed0.json").read_text())
    labels = ["none", "none, attention scale", "yarn", "yarn, attention scale"]
    labels += ["yarn, decoupled", "yarn, decoupled, attention scale"]
    assert list(first["rates"]) == labels
    for row in first["rates"].values():
        assert list(row) == ["2x2", "4x2"]
        assert all(round(10 * rate) == pytest.approx(10 * rate) for rate in row.values())  # of 10 digits
    assert first["settings"]["base_grid"] == 2 and first["settings"]["cfg_scale"] == 2.0  # from the run
    table = (out / "recognition-seed0.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| variant"))
    assert header == "| variant | paper | 2x2 | 4x2* | within L0 | beyond L0 |"
    assert sum(line.startswith("| ") for line in table) == 1 + len(labels)
    assert "| yarn, decoupled | VisionYaRN |" in "\n".join(table)
    # Within L0 every method is plain RoPE, with or without the attention factor (2 tables); at 4x2
    # none, none + scale, yarn, yarn + scale, and decoupled yarn (scale 2 on rows, 1 on columns) +/- scale.
    assert "80 images sampled for 12 cells (8 distinct RoPE tables)" in capsys.readouterr().out
    assert {(out / f"{m}-seed0.png").is_file() for m in ("none", "yarn")} == {True}

    assert (
        study(run_dir, out, "--seed", "1", "--no-grids", "--compare", str(out / "recognition-seed0.json"))
        == 0
    )
    second = json.loads((out / "recognition-seed1.json").read_text())
    differences = [abs(second["rates"][v][s] - first["rates"][v][s]) for v in labels for s in ("2x2", "4x2")]
    assert second["spread_mean"] == pytest.approx(np.mean(differences))
    assert f"mean {100 * np.mean(differences):.1f}" in (out / "recognition-seed1.md").read_text()

    capsys.readouterr()
    jsons = [str(out / f"recognition-seed{seed}.json") for seed in (0, 1)]
    assert extrapolation_study.main(["--summarize", *jsons]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "| variant (seed 0 / seed 1 (**mean**)) | within L0 | beyond, square | beyond, other | beyond L0 |"
    )
    inside, beyond = (first["rates"]["yarn"][s] for s in ("2x2", "4x2"))
    inside_1, beyond_1 = (second["rates"]["yarn"][s] for s in ("2x2", "4x2"))
    assert (
        lines[4]
        == (
            f"| yarn | {100 * inside:.0f} / {100 * inside_1:.0f} (**{50 * (inside + inside_1):.0f}**) | - / - (**-**) | "
            + f"{100 * beyond:.0f} / {100 * beyond_1:.0f} (**{50 * (beyond + beyond_1):.0f}**) | " * 2
        ).rstrip()
    )


def test_cells_with_equal_float32_tables_sample_equal_images(run_dir):
    """The study samples such cells once: plain RoPE and NTK-aware (s = 1, computed through exp/log)
    within L0 must then give the same image: equal tables, then the same arithmetic, so bit-equal."""
    plain = load_sampling_model(run_dir)
    overrides = extrapolation_study.Variant("ntk-aware", True, False).overrides(4)
    ntk = dataclasses.replace(plain.config, **overrides)
    assert extrapolation_study.table_key(ntk, (4, 3)) == extrapolation_study.table_key(plain.config, (4, 3))
    assert extrapolation_study.table_key(ntk, (5, 3)) != extrapolation_study.table_key(plain.config, (5, 3))
    items = [SampleItem(0, 3, 4, 3)]
    options = SamplingOptions(sampler="heun", steps=2, cfg_scale=2.0)
    expected = generate_latents(plain, items, options)[0]
    got = generate_latents(load_sampling_model(run_dir, overrides=overrides), items, options)[0]
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--methods", "none,vision-ntk"],
            "--methods 'none,vision-ntk': choose from none, linear, ntk-aware, ntk-by-parts, yarn, "
            "ntk-aware-pro1, ntk-aware-pro2 (comma-separated)",
        ),
        (
            ["--sizes", "8x"],
            "--sizes '8x': give grids in tokens as ROWSxCOLS, comma-separated, e.g. 8x8,8x16",
        ),
        (["--base-grid", "1"], "--base-grid 1: give the training grid edge L0 in tokens, 2 or more"),
    ],
)
def test_bad_arguments_are_one_line_errors_and_write_nothing(run_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    argv = ["--run", str(run_dir), "--out", str(out), "--per-class", "1", "--steps", "1", *extra]
    assert extrapolation_study.main(argv) == 2
    assert capsys.readouterr().err == f"extrapolation_study: error: {message}\n"
    assert not out.exists()


def test_existing_results_are_not_overwritten(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "recognition-seed0.json").write_text("{}")
    assert study(run_dir, out) == 2
    assert capsys.readouterr().err == (
        f"extrapolation_study: error: --out {out}: {out / 'recognition-seed0.json'} exists; "
        "pass --overwrite to replace it\n"
    )
    assert (out / "recognition-seed0.json").read_text() == "{}"
