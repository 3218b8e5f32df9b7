"""tools/ladder_study.py without training: equal-FLOPs steps, which runs are pending, the score cache,
steps to a threshold and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import ladder_study
import pytest

from fitscale.checkpoint.layout import DCP_METADATA_FILE, METADATA_FILE, step_dirname, temporary_dirname

TODAY = Path(__file__).resolve().parents[2] / "recipes" / "ladder" / "digits_today.yaml"


def ladder_in(tmp_path: Path, **changes) -> ladder_study.Ladder:
    ladder = ladder_study.load_ladder(TODAY)
    return ladder_study.Ladder(**{**vars(ladder), "out_dir": str(tmp_path / "runs"), **changes})


def fake_checkpoint(run_dir: str, step: int, complete: bool = True) -> Path:
    """A checkpoint folder as fitscale.checkpoint.layout sees it (both metadata files when complete)."""
    folder = Path(run_dir) / "checkpoints" / (step_dirname(step) if complete else temporary_dirname(step))
    folder.mkdir(parents=True)
    (folder / DCP_METADATA_FILE).write_bytes(b"")
    (folder / METADATA_FILE).write_text("{}")
    return folder


def test_every_rung_gets_the_reference_rungs_training_flops(tmp_path):
    ladder = ladder_in(tmp_path)
    runs = ladder_study.plan_ladder(ladder)
    assert [r.name for r in runs][:4] == ["fitv2_s0", "fitv2_s1", "fitv2_s2", "uniform-t_s0"]
    by_rung = {r.rung: r for r in runs if r.seed == 0}
    reference = by_rung["fitv2"]
    budget = reference.steps * reference.flops_per_step
    assert reference.steps == ladder.reference_steps and reference.interval == ladder.reference_steps // 8
    assert by_rung["uniform-t"].steps == reference.steps  # the same network: the same steps
    wide = by_rung["wide"]
    assert wide.flops_per_step > 2 * reference.flops_per_step  # width 192 against 128
    assert abs(wide.steps * wide.flops_per_step - budget) <= wide.flops_per_step / 2  # rounded to a step
    assert f"train.steps={wide.steps}" in wide.overrides and "train.seed=0" in wide.overrides
    assert "model.overrides.hidden_size=192" in wide.overrides
    assert ladder_study.equal_flops_steps(100, 3, 2) == 150 and ladder_study.equal_flops_steps(1, 1, 10) == 1


def test_finished_runs_are_skipped_and_unfinished_ones_continued(tmp_path):
    ladder = ladder_in(tmp_path, seeds=[0, 1])
    runs = ladder_study.plan_ladder(ladder)
    done, partial, torn, *new = runs
    fake_checkpoint(done.run_dir, done.steps)
    fake_checkpoint(partial.run_dir, partial.interval)
    fake_checkpoint(torn.run_dir, torn.steps, complete=False)  # a save that never finished
    assert ladder_study.pending_runs(runs) == [partial, torn, *new]
    assert ladder_study.train_ladder(ladder, [done]) == {}  # nothing to do: nothing started


def test_scores_are_cached_by_run_step_and_settings(tmp_path):
    ladder = ladder_in(tmp_path, seeds=[0], rungs=ladder_study.load_ladder(TODAY).rungs[:1])
    (run,) = ladder_study.plan_ladder(ladder)
    fake_checkpoint(run.run_dir, run.interval)  # not loadable: a cache miss would fail
    settings = ladder_study.quality_settings(ladder, ladder.rungs[0])
    key = f"{run.run_dir}/{step_dirname(run.interval)} {json.dumps(vars(settings), sort_keys=True)}"
    cache = tmp_path / "runs" / ladder_study.QUALITY_FILE
    cache.write_text(json.dumps({key: {"recognised": 0.5, "frechet": 3.0}}))
    assert ladder_study.score_runs(ladder, [run]) == {
        run.name: {run.interval: {"recognised": 0.5, "frechet": 3.0}}
    }
    other = ladder_in(tmp_path, seeds=[0], rungs=ladder.rungs, quality={**ladder.quality, "cfg_scale": 4.0})
    with pytest.raises(FileNotFoundError, match="config.yaml is missing"):  # other settings: a cache miss
        ladder_study.score_runs(other, [run])


def test_steps_to_threshold_interpolates_the_first_crossing():
    curve = {200: 0.1, 400: 0.3, 600: 0.7, 800: 0.5, 1000: 0.9}
    assert ladder_study.steps_to_threshold(curve, 0.5) == pytest.approx(500.0)
    assert ladder_study.steps_to_threshold(curve, 0.05) == 200.0  # reached at the first checkpoint
    assert ladder_study.steps_to_threshold(curve, 0.95) is None
    frechet = {100: 20.0, 200: 10.0, 300: 4.0}
    assert ladder_study.steps_to_threshold(frechet, 7.0, higher_is_better=False) == pytest.approx(250.0)


def test_summary_ratios_are_against_the_reference_rung(tmp_path):
    ladder = ladder_in(tmp_path, seeds=[0, 1])
    # fitv2 reaches 60% at step 300 (both seeds), uniform-t at 500 and 700: 2x the FLOPs on average
    curves = {
        "fitv2_s0": {200: 0.4, 400: 0.8},
        "fitv2_s1": {200: 0.4, 400: 0.8},
        "uniform-t_s0": {400: 0.4, 600: 0.8},
        "uniform-t_s1": {600: 0.4, 800: 0.8},
    }
    scores = {
        name: {s: {"recognised": v, "frechet": 1.0} for s, v in c.items()} for name, c in curves.items()
    }
    scores["wide_s0"] = {s: {"recognised": 0.3, "frechet": 5.0} for s in (90, 180)}  # never reaches 60%
    scores["wide_s1"] = scores["wide_s0"]
    runs = ladder_study.plan_ladder(ladder)
    rows = {r["rung"]: r for r in ladder_study.summarise(ladder, runs, scores)}
    assert rows["fitv2"]["steps_to_recognised"] == (300.0, 0.0, 2)
    assert rows["uniform-t"]["steps_to_recognised"][0] == pytest.approx(600.0)
    assert rows["uniform-t"]["ratio_recognised"] == pytest.approx(2.0)
    table = ladder_study.markdown_table(ladder, list(rows.values()))
    assert (
        "| uniform-t | 1600 | 80.0% ± 0.0% (2 seeds) | 1.00 ± 0.00 (2 seeds) | 600 ± 141 (2 seeds) | 2.00 |"
        in table
    )
    assert "| 1.00 | 1 | FiTv2-B/2 | 26.03 |" in table
    # wide never reaches the threshold: its ratio is only bounded, by its budget over fitv2's FLOPs to it
    wide, fitv2 = rows["wide"], rows["fitv2"]
    assert wide["ratio_recognised"] is None and wide["steps_to_recognised"] == (None, None, 0)
    bound = wide["steps"] * wide["flops_per_step"] / (300 * fitv2["flops_per_step"])
    assert wide["ratio_recognised_above"] == pytest.approx(bound)
    assert f"| not reached | > {bound:.2f} | - |" in table
    # with a Frechet threshold too: each run's Frechet distance falls 4 -> 2 between the same
    # checkpoints, so it crosses 3.0 where recognition crosses 60%: fitv2 at 300, uniform-t at 600
    for name in ("fitv2_s0", "fitv2_s1", "uniform-t_s0", "uniform-t_s1"):
        for step, value in zip(sorted(scores[name]), (4.0, 2.0)):
            scores[name][step]["frechet"] = value
    both = ladder_in(tmp_path, seeds=[0, 1], threshold_frechet=3.0)
    rows = {r["rung"]: r for r in ladder_study.summarise(both, runs, scores)}
    assert rows["fitv2"]["steps_to_frechet"][0] == 300.0 and rows["uniform-t"][
        "ratio_frechet"
    ] == pytest.approx(2.0)
    assert "| 300 ± 0 (2 seeds) | 1.00 |" in ladder_study.markdown_table(both, list(rows.values()))


def test_refusals_name_the_problem_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^ladder 'digits-today': reference 'fit' is not a rung; rungs: "):
        ladder_in(tmp_path, reference="fit")
    with pytest.raises(ValueError, match=r"^--rungs: no rung named dit; rungs: fitv2, uniform-t, wide$"):
        ladder_study.plan_ladder(ladder_in(tmp_path), ["dit"])
    bogus = ladder_study.Rung("v1", ["model.overrides.no_such_switch=1"])
    with pytest.raises(
        ValueError,
        match=r"^ladder 'digits-today', rung 'v1': unknown config key 'model\.overrides\.no_such_switch",
    ):
        ladder_study.plan_ladder(ladder_in(tmp_path, rungs=[*ladder_in(tmp_path).rungs, bogus]))
    with pytest.raises(
        ValueError, match=r"^--reference-steps 100 changes every run's steps: give it an --out-dir"
    ):
        ladder_study.main(["plan", str(TODAY), "--reference-steps", "100"])
