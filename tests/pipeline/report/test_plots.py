"""Figures are written atomically, with the mode a plain write would give."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from calodistill.pipeline.report import plots


def test_figure_written_atomically_with_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = plots.plot_nll_per_energy_bin(np.array([1e3, 1e4, 1e5]), {"teacher": [1.0, 2.0]},
                                             tmp_path / "figs" / "nll.png")
    finally:
        os.umask(old)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["nll.png"]


def test_failed_figure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.figure

    def fail(self: object, *args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        plots.plot_training_curves({"train_nll": [3.0, 2.0]}, tmp_path / "curves.png")
    assert list(tmp_path.iterdir()) == []
