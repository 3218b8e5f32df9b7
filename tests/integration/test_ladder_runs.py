"""tools/ladder_study.py end to end: two rungs at equal FLOPs trained by `fitscale train` subprocesses,
every checkpoint scored by the digits quality metric, and a second pass that trains and scores
nothing again."""

from __future__ import annotations

import json
from pathlib import Path

import ladder_study
import pytest
import yaml

pytestmark = pytest.mark.slow
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"


def test_ladder_trains_scores_and_resumes_without_redoing_anything(tmp_path):
    from fitscale.data.sources import build_digits
    from fitscale.data.writer import WriteSettings, write_dataset

    data = tmp_path / "digits"
    build, count = build_digits(seed=0, dtype="float32", max_side=8)
    settings = WriteSettings(writer="digits", num_classes=10, options={"dtype": "float32"})
    write_dataset(data, [(d, 0) for d in range(0, count, 8)], build, settings, progress=False)
    spec = {
        "name": "tiny-ladder",
        "recipe": str(RECIPE),
        "out_dir": str(tmp_path / "runs"),
        "reference": "narrow",
        "reference_steps": 8,
        "seeds": [0],
        "eval_points": 2,
        "overrides": [
            f"data.path={data}",
            "parallel.sharding=none",
            "launch.tasks_per_node=1",
            "hooks.before=[]",
            "hooks.after=[]",
            "model.overrides.hidden_size=64",
            "model.overrides.attn_backend=reference",
        ],
        "quality": {"per_class": 1, "grids": [[4, 4]], "steps": 2},
        "threshold_recognised": 0.05,
        "rungs": [
            {"name": "narrow", "paper": "FiTv2-B/2"},
            {"name": "wide", "overrides": ["model.overrides.hidden_size=128"]},
        ],
    }
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(spec))
    docs = tmp_path / "docs"
    ladder_study.main(["train", str(path), "--jobs", "2"])
    ladder = ladder_study.load_ladder(path)
    runs = ladder_study.plan_ladder(ladder)
    narrow, wide = runs
    assert wide.steps < narrow.steps == 8
    assert ladder_study.pending_runs(runs) == []
    checkpoints = {
        r.name: sorted(p.name for p in (Path(r.run_dir) / "checkpoints").glob("step-*")) for r in runs
    }
    assert checkpoints["narrow_s0"] == ["step-4", "step-8"]

    ladder_study.main(["report", str(path), "--docs", str(docs), "--jobs", "2"])  # 2 scoring processes
    results = json.loads((docs / "results.json").read_text())
    scored = {r["rung"]: r["quality"] for r in results["runs"]}
    assert sorted(scored["narrow"]) == ["4", "8"]  # every checkpoint scored
    assert all(0 <= q["recognised"] <= 1 and q["frechet"] > 0 for q in scored["narrow"].values())
    rows = {r["rung"]: r for r in results["rungs"]}
    assert rows["wide"]["flops_per_step"] > rows["narrow"]["flops_per_step"]
    assert "| narrow | 8 |" in (docs / "table.md").read_text()

    # A second pass: nothing trains (logs untouched), nothing is scored again (cache untouched).
    logs = {p: p.read_text() for p in (tmp_path / "runs" / "logs").iterdir()}
    cache = tmp_path / "runs" / ladder_study.QUALITY_FILE
    before = cache.stat().st_mtime_ns, cache.read_text()
    assert ladder_study.train_ladder(ladder, runs, jobs=2) == {}
    ladder_study.main(["report", str(path), "--docs", str(docs)])
    assert {p: p.read_text() for p in (tmp_path / "runs" / "logs").iterdir()} == logs
    assert (cache.stat().st_mtime_ns, cache.read_text()) == before
