"""tools/bench_fsdp_prefetch.py on 2 CPU ranks (gloo): every depth measured, and the same numbers."""

from __future__ import annotations

import json

import bench_fsdp_prefetch
import pytest


@pytest.mark.slow  # two FSDP ranks
def test_prefetch_depths_measured_side_by_side_with_identical_losses(tmp_path):
    out = tmp_path / "prefetch.json"
    argv = "--spawn 2 --model tiny --depth 3 --images 4 --steps 1 --warmup 1 --threads 1 --prefetch 0,2"
    assert bench_fsdp_prefetch.main([*argv.split(), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and [r["fsdp_prefetch"] for r in report["results"]] == [0, 2]
    plain, prefetched = report["results"]
    assert all(r["step_ms"] > 0 for r in report["results"])
    assert prefetched["last_losses"] == plain["last_losses"]  # prefetch moves all-gathers, not numbers
    assert plain["last_losses"][0] != plain["last_losses"][1]  # each rank trained on its own images


def test_without_torchrun_or_spawn_it_says_how_to_run(capsys):
    with pytest.raises(SystemExit):
        bench_fsdp_prefetch.main([])
    assert "run under torchrun, or pass --spawn N to start N local ranks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_fsdp_prefetch.main(["--prefetch", "1,x"])
    assert "--prefetch takes comma-separated integers, got '1,x'" in capsys.readouterr().err
