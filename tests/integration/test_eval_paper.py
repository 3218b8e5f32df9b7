"""`fitscale eval-paper` end to end on CPU: a tiny random FiT weights file, a tiny random-weights
AutoencoderKL, an Inception network of random weights and reference batches built by `eval-ref`,
for 2 sizes: sampled, evaluated, tabulated, and a rerun that finds everything done."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers.eval_batches import smooth_pictures
from helpers.tiny_models import tiny_model, tiny_vae
from PIL import Image

from fitscale.cli import main

pytestmark = pytest.mark.slow
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")


def test_paper_tables_hold_every_metric_and_name_each_sizes_reference(tmp_path, capsys):
    """32x32 has its own reference (`ref_32x32.npz`); 32x48 has none, so it falls back to the
    table's ADM batch (`VIRTUAL_imagenet256_labeled.npz`, here built by eval-ref at 32x48). Each
    row of table.json holds the five numbers (finite), the reference it used and the sampling
    flags; table.md has one line per size naming that reference, labelled not comparable (random
    Inception weights). A second run samples and evaluates nothing: every output is kept."""
    from safetensors.torch import save_file

    from fitscale.eval.inception import save_random_weights

    save_file(tiny_model().state_dict(), str(tmp_path / "tiny.safetensors"))
    tiny_vae().save_pretrained(tmp_path / "vae")
    sha = save_random_weights(tmp_path / "inception.pth")
    inception = ["--inception-weights", str(tmp_path / "inception.pth"), "--inception-sha256", sha]
    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    for i, picture in enumerate(smooth_pictures(rng, 5, 56)):
        Image.fromarray(picture[: 40 + 4 * i]).save(tmp_path / "train" / f"{i}.png")
    refs = tmp_path / "refs"
    for size, name in (("32x32", "ref_32x32.npz"), ("32x48", "VIRTUAL_imagenet256_labeled.npz")):
        argv = ["eval-ref", str(tmp_path / "train"), "--size", size, "--out", str(refs / name), *inception]
        assert main([*argv, "--device", "cpu", "--batch-size", "5"]) == 0
    out = tmp_path / "paper"
    sample_args = "--model tiny --set attn_backend=reference --steps 2 --cfg 1.5"
    argv = ["eval-paper", str(tmp_path / "tiny.safetensors"), "--refs", str(refs), "--out", str(out),
            "--sizes", "32x32,32x48", "--num", "4", "--vae", str(tmp_path / "vae"), "--sample-args", sample_args,
            "--device", "cpu", "--batch-size", "4", *inception]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    rows = json.loads((out / "table.json").read_text())
    assert [row["size"] for row in rows] == ["32x32", "32x48"]
    used = {"32x32": "ref_32x32.npz", "32x48": "VIRTUAL_imagenet256_labeled.npz"}
    for row in rows:
        assert row["reference"] == str(refs / used[row["size"]])
        assert row["images"] == 4 and row["size"] in row["sample"] and row["sample_args"] == sample_args
        assert all(math.isfinite(row[key]) for key in METRICS), row
        assert row["fid"] > 0 and row["inception_score"] >= 1 and row["comparable"] is False
    lines = (out / "table.md").read_text().splitlines()
    assert lines[0] == "| size | FID | sFID | IS | Precision | Recall | images | reference | sampling |"
    for line, row in zip(lines[2:], rows, strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[0] == row["size"] and cells[7] == f"{used[row['size']]} (not comparable)"
        assert [float(cell) for cell in cells[1:6]] == [round(row[key], 2) for key in METRICS]
    kept = {
        path: path.stat().st_mtime_ns
        for path in out.rglob("*")
        if path.is_file() and "table" not in path.name
    }
    assert main(argv) == 0  # resumed: every size sampled and evaluated already
    assert {path: path.stat().st_mtime_ns for path in kept} == kept
    assert json.loads((out / "table.json").read_text()) == rows
