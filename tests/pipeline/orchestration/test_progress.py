"""The stage bars of a running pipeline (pipeline/orchestration/progress.py)."""

from __future__ import annotations

import pytest

from calodistill.pipeline.orchestration.progress import StageProgress


def test_one_bar_per_stage_with_its_state(capsys: pytest.CaptureFixture[str]) -> None:
    bars = StageProgress(["ingest", "train_teacher"], enabled=True)
    bars.started("train_teacher", resumed=True)
    bars.step("train_teacher", 3)
    bars.finished("train_teacher", "ran")
    bars.finished("ingest", "skipped")
    bars.close()
    err = capsys.readouterr().err
    assert "train_teacher  resumed" in err and "train_teacher  ran " in err and "ingest         skipped" in err
    assert len(bars.bars) == 2


def test_no_bars_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    bars = StageProgress(["ingest"])  # stderr is not a terminal under pytest
    bars.started("ingest")
    bars.finished("ingest", "ran")
    assert capsys.readouterr().err == ""
