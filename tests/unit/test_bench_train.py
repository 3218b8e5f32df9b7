"""tools/bench_train.py on CPU: every mode measured side by side, a missing backend reported, not fatal."""

from __future__ import annotations

import json

import bench_train
import pytest
import torch

from fitscale.data.batch import PADDING_SEGMENT_TOKENS
from fitscale.models.attention import flash_attn_available, length_groups


def test_collator_order_needs_no_gather_and_arrival_order_does():
    grids = bench_train.imagenet_like_grids(32, 256, seed=0)
    assert len({r * c for r, c in grids}) > 3
    common = dict(token_dim=16, max_tokens=256, padded=False, budget=8192, device="cpu", num_classes=10)
    sorted_inputs = bench_train.build_step_inputs(grids, **common)
    lengths = (sorted_inputs["cu_seqlens"][1:] - sorted_inputs["cu_seqlens"][:-1]).tolist()
    images, tail = lengths[: len(grids)], lengths[len(grids) :]
    assert images == sorted(images, reverse=True) and images != [r * c for r, c in grids]
    assert sum(tail) == 8192 - sum(images) and max(tail) <= PADDING_SEGMENT_TOKENS  # as the collator pads
    assert length_groups(sorted_inputs["cu_seqlens"]).order is None
    arrival = bench_train.build_step_inputs(grids, **common, sort_by_length=False)
    assert length_groups(arrival["cu_seqlens"]).order is not None
    assert (
        int(sorted_inputs["real_mask"].sum())
        == int(arrival["real_mask"].sum())
        == sum(r * c for r, c in grids)
    )


def test_modes_side_by_side_with_ratios_and_a_missing_backend_reported(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = "--model tiny --depth 1 --mix 256 --images 4 --steps 1 --warmup 1"
    argv += " --modes grouped,reference,padded,flash --threads 1 --repeats 2 --json"
    assert bench_train.main([*argv.split(), str(out)]) == 0
    report = json.loads(out.read_text())
    results = {r["mode"]: r for r in report["results"]}
    assert report["padded_over_real_tokens"] > 1.0
    assert results["padded"]["speedup_vs_padded"] == 1.0
    for mode in ("grouped", "reference"):
        result = results[mode]
        assert result["speedup_vs_padded"] == pytest.approx(
            result["real_tokens_per_s"] / results["padded"]["real_tokens_per_s"]
        )
        passes = result["step_ms_passes"]
        assert len(passes) == 2 and result["step_ms"] == min(passes)
        assert result["speedup_vs_padded_median"] == pytest.approx(
            sum(results["padded"]["step_ms_passes"]) / sum(passes)  # the median of two is their mean
        )
        # packed steps compute the real tokens plus one short static tail, padded ones the limit
        assert result["computed_tokens_per_s"] / result["real_tokens_per_s"] < 1.5
    padded = results["padded"]
    assert padded["computed_tokens_per_s"] / padded["real_tokens_per_s"] == pytest.approx(
        report["padded_over_real_tokens"], rel=0.3
    )
    if not flash_attn_available():
        assert results["flash"]["error"].endswith(
            "needs the flash-attn package: pip install 'fitscale[flash]'"
        )
    assert "grouped" in capsys.readouterr().out


def test_bad_arguments_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(["--repeats", "0"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err
    torch.set_num_threads(torch.get_num_threads())


@pytest.mark.numeric
def test_static_segments_change_no_output():
    """`+static` appends zero-length segments and fixes max_seqlen: every token's output is unchanged."""
    from fitscale.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", depth=1, attn_backend="grouped").eval()
    grids = bench_train.imagenet_like_grids(6, 256, seed=1)
    inputs = bench_train.build_step_inputs(grids, model.config.token_dim, 256, False, 1536, "cpu", 10)
    static = bench_train.with_static_segments(inputs, inputs["num_segments"] + 5, 256, 10)
    assert static["cu_seqlens"].numel() == inputs["cu_seqlens"].numel() + 5
    t = torch.rand(static["num_segments"])
    with torch.no_grad():
        outputs = [
            model(
                s["x1"],
                t[: s["num_segments"]],
                s["labels"],
                s["pos"],
                s["cu_seqlens"],
                s["max_seqlen"],
                s["sizes"],
            )
            for s in (inputs, static)
        ]
    # Padding segments of length 0 change no token's arithmetic (the same shapes and kernels): exact.
    assert torch.equal(outputs[1], outputs[0])
    assert inputs["num_segments"] == 8 and inputs["max_seqlen"] == 247  # 6 images, 2 padding segments
    with pytest.raises(ValueError, match="a step has 8 segments and a longest one of 247"):
        bench_train.with_static_segments(inputs, 7, 256, 10)
    with pytest.raises(ValueError, match="a step has 8 segments and a longest one of 247"):
        bench_train.with_static_segments(inputs, 8, 200, 10)


def test_profile_step_lists_the_operators_of_a_cpu_step_and_names_a_missing_backend(capsys):
    import profile_step

    # Every operator is listed (--top 200): which ones rank first by self time depends on the machine's load.
    argv = ["--model", "tiny", "--depth", "1", "--images", "4", "--steps", "1", "--top", "200"]
    assert profile_step.main(argv) == 0
    out = capsys.readouterr().out
    assert "aten::mm" in out and "Self CPU time total" in out
    if not flash_attn_available():
        assert profile_step.main([*argv, "--mode", "flash"]) == 1
        assert "profile_step: flash: RuntimeError: attn_backend='flash' needs the flash-attn package" in (
            capsys.readouterr().err
        )


def test_float8_modes_report_the_converted_linears(tmp_path):
    pytest.importorskip("torchao.float8", reason="the float8 extra (torchao) is not installed")
    out = tmp_path / "bench.json"
    argv = "--model tiny --depth 1 --mix 256 --images 4 --steps 1 --warmup 1 --threads 1"
    argv += " --modes reference,reference+fp8,reference+fp8row --float8-all --json"
    assert bench_train.main([*argv.split(), str(out)]) == 0
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert "float8_converted" not in results["reference"]
    for mode in ("reference+fp8", "reference+fp8row"):  # qkv and proj; the SwiGLU's 170 is no multiple of 16
        assert "error" not in results[mode]
        assert (results[mode]["float8_converted"], results[mode]["float8_kept"]) == (2, 11)
