"""Training checkpoints: reading them, and the RNG state that makes a resumed run end where an uninterrupted one ends.

Everything is stored as tensors and plain types, so checkpoints load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import FlowsError

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "rng_state", "seed_all", "set_rng_state"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint dict (``weights_only``); a FlowsError naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file
        raise FlowsError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc


def rng_state() -> dict[str, Any]:
    """The torch, numpy, python and CUDA RNG states, as tensors and plain types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": int(py_version), "state": [int(v) for v in py_state], "gauss": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (the CUDA part only on the same devices)."""
    torch.set_rng_state(state["torch"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    if state["cuda"] and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except Exception:  # different number of GPUs: keep the seeded state
            logger.warning("checkpoint: could not restore the CUDA RNG state (different devices)")


def seed_all(seed: int) -> None:
    """Seed the python, numpy and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
