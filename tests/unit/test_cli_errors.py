"""What the command line prints for an error: one line and status 2 for bad input (a UserError), a
traceback, a line saying how to report it and status 1 for anything else (a bug), a plain ValueError
from inside torch included."""

from __future__ import annotations

import pytest
import torch

import fitscale.models.cli
from fitscale.cli import main
from fitscale.clitools import BUG_NOTE


def test_bad_input_prints_one_line_with_status_2(capsys):
    assert main(["info", "fitv2-nonexistent"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"fitscale info: error: unknown model 'fitv2-nonexistent'; choose one of {', '.join(preset_names())}"
    ]


def preset_names() -> list[str]:
    from fitscale.config.model import PRESETS

    return list(PRESETS)


@pytest.mark.parametrize("where", ["torch", "ours"])
def test_a_value_error_from_a_bug_prints_its_traceback_and_how_to_report_it(where, monkeypatch, capsys):
    def buggy_info(args) -> int:
        if where == "torch":  # a ValueError raised inside torch: a call torch's own check refuses
            torch.nn.functional.interpolate(torch.zeros(1, 1, 2), size=3, scale_factor=2.0)
        raise ValueError("an internal check failed")

    monkeypatch.setattr(fitscale.models.cli, "run_info", buggy_info)
    monkeypatch.delenv("FITSCALE_DEBUG", raising=False)
    assert main(["info", "tiny"]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "in buggy_info" in "\n".join(lines)
    message = (
        "ValueError: only one of size or scale_factor"
        if where == "torch"
        else "ValueError: an internal check failed"
    )
    assert any(line.startswith(message) for line in lines)
    assert lines[-1] == BUG_NOTE.format(command="info")
