"""Training histories of a model directory: history.json, any JSON with a history, the last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from calodistill.pipeline.data.history import load_history, split_histories

EPOCHS = [{"epoch": 1.0, "train_nll": 3.0}, {"epoch": 2.0, "train_nll": 2.5}]


def test_history_json_first(tmp_path: Path) -> None:
    (tmp_path / "history.json").write_text(json.dumps({"flow1": EPOCHS, "teacher": EPOCHS}))
    (tmp_path / "other.json").write_text(json.dumps({"history": [{"epoch": 9.0}]}))
    assert load_history(tmp_path) == {"flow1": EPOCHS, "teacher": EPOCHS}
    (tmp_path / "history.json").write_text(json.dumps({"history": EPOCHS}))
    assert load_history(tmp_path) == EPOCHS


def test_other_json_then_checkpoint_then_none(tmp_path: Path) -> None:
    assert load_history(tmp_path) is None
    (tmp_path / "ckpt").mkdir()
    torch.save({"model": {"w": torch.zeros(1)}, "history": EPOCHS}, tmp_path / "ckpt" / "last.pt")
    assert load_history(tmp_path) == EPOCHS
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "config.json").write_text(json.dumps({"history": EPOCHS[:1]}))
    assert load_history(tmp_path) == EPOCHS[:1]


def test_checkpoint_with_code_is_skipped(tmp_path: Path) -> None:
    torch.save({"history": EPOCHS, "hook": Path("x")}, tmp_path / "last.pt")  # not loadable weights-only
    assert load_history(tmp_path) is None


def test_split_histories() -> None:
    assert split_histories("teacher", {"flow1": EPOCHS, "teacher": EPOCHS}) == {"teacher_flow1": EPOCHS,
                                                                                "teacher": EPOCHS}
    assert split_histories("student", EPOCHS) == {"student": EPOCHS}
    assert split_histories("student", {"train_nll": [3.0, 2.5]}) == {"student": {"train_nll": [3.0, 2.5]}}
    assert split_histories("student", None) == {} and split_histories("student", []) == {}
