"""Atomic writes: all or nothing, and the mode a plain write would give (0o666 minus the umask)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from calodistill.pipeline.atomic import atomic_path, atomic_write_json, atomic_write_text, current_umask


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_file_honours_the_umask(tmp_path: Path, umask: None) -> None:
    assert current_umask() == 0o022
    assert _mode(atomic_write_text(tmp_path / "a.txt", "x")) == 0o644
    assert _mode(atomic_write_json(tmp_path / "sub" / "a.json", {"a": 1})) == 0o644
    os.umask(0o077)
    assert current_umask() == 0o077
    assert _mode(atomic_write_text(tmp_path / "private.txt", "x")) == 0o600
    os.umask(0o002)
    assert _mode(atomic_write_text(tmp_path / "group.txt", "x")) == 0o664


def test_replace_is_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]  # no temporary file left
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.") and tmp.suffix == ".tmp"
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_json_options(tmp_path: Path) -> None:
    import numpy as np

    path = atomic_write_json(tmp_path / "m.json", {"b": np.float32(0.5), "a": np.arange(2)})
    assert path.read_text() == '{\n  "a": [\n    0,\n    1\n  ],\n  "b": 0.5\n}\n'
    atomic_write_json(path, {"b": 1, "a": 2}, sort_keys=False)
    assert list(json.loads(path.read_text())) == ["b", "a"]
    with pytest.raises(ValueError):
        atomic_write_json(path, {"x": float("nan")}, allow_nan=False)
    assert json.loads(path.read_text()) == {"b": 1, "a": 2}
