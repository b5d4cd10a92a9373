"""Training histories of a model directory: the per-epoch metrics the training stages recorded.

The evaluation plots them as training curves; a directory written by an older version may keep its
history in another JSON file or only in its last checkpoint, so those are searched too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_history", "split_histories"]

logger = logging.getLogger(__name__)

_HISTORY_FILES = ("history.json", "training_history.json", "train_history.json")


def load_history(model_dir: Path | str) -> Any | None:
    """Per-epoch training metrics of a model directory, or None when it holds none.

    Looks at ``history.json`` (or ``training_history.json`` / ``train_history.json``), then any JSON file
    with a non-empty ``"history"`` entry, then the ``history`` of a ``last.pt`` checkpoint (loaded with
    ``weights_only=True``: never runs code).

    Returns:
        As stored: a list of epoch dicts, or ``{flow: [epoch dicts]}`` for a directory with several flows.
    """
    model_dir = Path(model_dir)
    for name in _HISTORY_FILES:
        p = model_dir / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            return data.get("history", data) if isinstance(data, dict) else data
    for p in sorted(model_dir.rglob("*.json")):
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and isinstance(data.get("history"), (list, dict)) and data["history"]:
            return data["history"]
    for p in sorted(model_dir.rglob("last.pt")):
        try:
            ckpt = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - checkpoints with non-tensor payloads are not loadable safely
            logger.debug("history: cannot load %s with weights_only=True; skipped", p)
            continue
        if isinstance(ckpt, dict) and ckpt.get("history"):
            return ckpt["history"]
    return None


def split_histories(name: str, history: Any) -> dict[str, Any]:
    """One entry per trained flow, named after the model: ``("teacher", {"flow1": [...], "teacher": [...]})``
    → ``{"teacher_flow1": [...], "teacher": [...]}``; a single history → ``{name: history}``."""
    if not history:
        return {}
    if isinstance(history, dict) and history and all(isinstance(v, list) and v and isinstance(v[0], dict)
                                                     for v in history.values()):
        return {(name if part == name else f"{name}_{part}"): v for part, v in history.items()}
    return {name: history}
