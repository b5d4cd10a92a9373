"""Saving and loading flows and whole generators (preprocessing + Flow I + Flow II).

A flow file is one ``torch.save`` of a plain dict — format tag, model name ("MAF" or "IAF"), the
:class:`~flows.config.FlowConfig` as a dict, and the ``state_dict`` — read back with
``torch.load(weights_only=True)``: no pickled code. Writes are atomic (temporary file + ``os.replace``).

A generator directory holds ``preprocessing.json``, ``flow1.pt`` and ``teacher.pt`` and/or
``student.pt``; :func:`load_generator` prefers the student.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import FlowConfig
from .errors import FlowsError
from .models import IAF, MAF, build_flow
from .preprocessing import CaloFlowPreprocessor
from .sampling import ShowerGenerator

logger = logging.getLogger(__name__)

FLOW_FORMAT = "calodistill-flow"
FLOW_FORMAT_VERSION = 1
PREPROCESSING_FILE = "preprocessing.json"
FLOW1_FILE = "flow1.pt"
TEACHER_FILE = "teacher.pt"
STUDENT_FILE = "student.pt"


def _model_name(flow: nn.Module) -> str:
    if isinstance(flow, IAF):
        return "IAF"
    if isinstance(flow, MAF):
        return "MAF"
    raise FlowsError(f"flow: expected a MAF or IAF, got {type(flow).__name__}")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def flow_payload(flow: nn.Module, cfg: FlowConfig | None = None) -> dict[str, Any]:
    """The dict :func:`save_flow` writes (tensors moved to CPU), for embedding in checkpoints."""
    cfg = cfg if cfg is not None else flow.config
    if cfg != flow.config:
        raise FlowsError("cfg: does not match the flow's own configuration")
    return {
        "format": FLOW_FORMAT,
        "version": FLOW_FORMAT_VERSION,
        "model": _model_name(flow),
        "config": cfg.to_dict(),
        "dtype": str(next(flow.parameters()).dtype).removeprefix("torch."),
        "state_dict": {k: v.detach().cpu() for k, v in flow.state_dict().items()},
    }


def flow_from_payload(payload: dict[str, Any], source: str = "flow") -> MAF | IAF:
    """Rebuild a flow from :func:`flow_payload` output (float32 unless it was saved otherwise)."""
    if not isinstance(payload, dict) or payload.get("format") != FLOW_FORMAT:
        raise FlowsError(f"{source}: not a calodistill flow file")
    if payload.get("version") != FLOW_FORMAT_VERSION:
        raise FlowsError(f"{source}: unsupported flow format version {payload.get('version')!r}")
    cfg = FlowConfig.from_dict(payload["config"], source=f"{source} config")
    flow = build_flow(payload["model"], cfg)
    dtype = getattr(torch, payload.get("dtype", "float32"), torch.float32)
    flow = flow.to(dtype=dtype)
    try:
        flow.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise FlowsError(f"{source}: weights do not match the configuration ({first})") from None
    flow.eval()
    return flow


def save_flow(path: Path, flow: nn.Module, cfg: FlowConfig | None = None) -> None:
    """Write one flow (config + weights) to ``path`` atomically."""
    atomic_torch_save(flow_payload(flow, cfg), Path(path))
    logger.info("saved %s to %s", _model_name(flow), path)


def load_flow(path: Path, device: str | torch.device | None = None) -> MAF | IAF:
    """Read a flow written by :func:`save_flow` (``weights_only=True``), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FlowsError(f"{path}: no such flow file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FlowsError(f"{path}: cannot read flow file ({first})") from None
    flow = flow_from_payload(payload, source=str(path))
    return flow.to(device) if device is not None else flow


def save_generator_dir(model_dir: Path, preprocessor: CaloFlowPreprocessor, flow1: MAF,
                       flow1_cfg: FlowConfig | None, flow2: MAF | IAF, flow2_cfg: FlowConfig | None,
                       kind: str = "teacher") -> None:
    """Write a self-contained generator directory (``kind`` = "teacher" or "student")."""
    if kind not in ("teacher", "student"):
        raise FlowsError(f"kind: must be 'teacher' or 'student', got {kind!r}")
    expected = IAF if kind == "student" else MAF
    if not isinstance(flow2, expected):
        raise FlowsError(f"flow2: a {kind} must be {'an IAF' if kind == 'student' else 'a MAF'}")
    if not isinstance(flow1, MAF):
        raise FlowsError("flow1: must be a MAF")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    preprocessor.save(model_dir / PREPROCESSING_FILE)
    save_flow(model_dir / FLOW1_FILE, flow1, flow1_cfg)
    save_flow(model_dir / (STUDENT_FILE if kind == "student" else TEACHER_FILE), flow2, flow2_cfg)


def load_generator(model_dir: Path, prefer: str | None = None,
                   device: str | torch.device | None = None) -> ShowerGenerator:
    """A :class:`ShowerGenerator` from a generator directory.

    Args:
        model_dir: directory written by :func:`save_generator_dir`.
        prefer: "student", "teacher", or None (student if present, else teacher).
        device: where sampling runs (CUDA when available if None).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FlowsError(f"{model_dir}: no such model directory")
    if prefer not in (None, "student", "teacher"):
        raise FlowsError(f"prefer: must be 'student', 'teacher' or None, got {prefer!r}")
    order = [prefer] if prefer else ["student", "teacher"]
    names = {"student": STUDENT_FILE, "teacher": TEACHER_FILE}
    flow2_path = next((model_dir / names[k] for k in order if (model_dir / names[k]).is_file()), None)
    if flow2_path is None:
        raise FlowsError(f"{model_dir}: no {' or '.join(names[k] for k in order)} found")
    for required in (PREPROCESSING_FILE, FLOW1_FILE):
        if not (model_dir / required).is_file():
            raise FlowsError(f"{model_dir}: missing {required}")
    pre = CaloFlowPreprocessor.load(model_dir / PREPROCESSING_FILE)
    flow1 = load_flow(model_dir / FLOW1_FILE)
    flow2 = load_flow(flow2_path)
    return ShowerGenerator(pre, flow1, flow2, device=device)
