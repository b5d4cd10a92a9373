"""Published CaloChallenge numbers: the leaderboard files beside the checkout, and the built-in fallback."""

from __future__ import annotations

from pathlib import Path

import pytest

from calodistill.pipeline.report import leaderboard
from calodistill.pipeline.report.leaderboard import published_results, results_dir


def test_published_numbers() -> None:
    caption, rows = published_results("calochallenge-1-photons")
    assert rows["CaloFlow student"]["auc_low"] == pytest.approx(0.76064, abs=1e-4)
    assert rows["GEANT4"]["auc_high"] == pytest.approx(0.4994, abs=1e-3)
    caption, _ = published_results("calogan")
    assert "orientation" in caption


def test_results_dir_finds_the_shared_leaderboard(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CALODISTILL_RESULTS_DIR", raising=False)
    found = results_dir()
    assert found is not None
    assert found.resolve() == (shared_dir / "data" / "real" / "calochallenge-results").resolve()
    caption, rows = published_results("calochallenge-2")  # read from the file: no built-in numbers for ds2
    assert "dataset 2" in caption and "GEANT4" in rows


def test_without_the_files_the_builtin_numbers_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALODISTILL_RESULTS_DIR", str(tmp_path))
    assert results_dir() == tmp_path  # the environment wins; this folder holds no leaderboard file
    caption, rows = published_results("calochallenge-1-photons")
    assert rows == leaderboard.CALOFLOW_DS1_PHOTONS and rows is not leaderboard.CALOFLOW_DS1_PHOTONS
    caption, rows = published_results("calochallenge-3")
    assert rows == {} and "not found" in caption
