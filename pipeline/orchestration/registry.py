"""Stage kinds: what a DAG stage of each ``kind:`` declares, and the registry that names them.

A stage kind declares its inputs, outputs and parameters, and an adapter that turns a
:class:`StageContext` into one call of a stage function, returning a :class:`StageResult` (metrics,
artifacts to log, tags, and which output is a model to log in MLflow). The built-in kinds live in
:mod:`.stage_kinds`; tests and plugins add kinds with :func:`register_stage_kind`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CalodistillError

__all__ = [
    "InputSpec",
    "StageContext",
    "StageKind",
    "StageResult",
    "get_stage_kind",
    "register_stage_kind",
    "stage_kind_names",
    "unregister_stage_kind",
]

logger = logging.getLogger(__name__)

MetricsCallback = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class InputSpec:
    """An input a stage kind accepts.

    Attributes:
        required: the DAG must give it.
        multiple: it takes a list of values.
        description: what it is.
    """

    required: bool = True
    multiple: bool = False
    description: str = ""


@dataclass
class StageContext:
    """Everything a stage adapter receives.

    Attributes:
        stage: the stage name.
        kind: the stage kind.
        inputs: input name → absolute :class:`~pathlib.Path` (stage outputs, files) or ``str`` (literal URIs);
            a list for inputs that take several.
        outputs: output name → absolute path inside ``work_dir`` (not yet existing or partial on resume).
        work_dir: the stage directory (persists across interrupted attempts; training checkpoints live here).
        params: the stage parameters from the DAG (after overrides).
        log_metrics: ``log_metrics(metrics, step)``, forwarded to MLflow as the stage runs.
        scheduler: address of the Dask cluster the stage runs on (for stages that fan out), or None.
    """

    stage: str
    kind: str
    inputs: dict[str, Any]
    outputs: dict[str, Path]
    work_dir: Path
    params: dict[str, Any]
    log_metrics: MetricsCallback
    scheduler: str | None = None


@dataclass
class StageResult:
    """What a stage adapter returns.

    Attributes:
        metrics: final metrics (floats) logged on the stage's MLflow run.
        artifacts: ``(local path, artifact directory or "")`` pairs to log on the stage run.
        tags: extra tags for the stage run (device, dataset hash, ...).
        model_output: name of the output that holds a model directory to log as an MLflow model.
        info: anything else JSON-able worth keeping in the completion marker.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: list[tuple[str, str]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    model_output: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageKind:
    """A registered kind of stage.

    Attributes:
        name: the ``kind:`` value in DAG files.
        run: the adapter ``run(ctx) -> StageResult``.
        inputs: accepted inputs.
        outputs: output name → default path relative to the stage directory.
        params: accepted parameter keys (None: any, checked by ``validate_params`` or the stage function).
        validate_params: optional check run when the DAG is loaded; raises CalodistillError.
        key_metric: metric shown in the run summary table.
        model_role: "teacher" or "student" when ``model`` output is a generator to log in MLflow.
        description: one line.
    """

    name: str
    run: Callable[[StageContext], StageResult]
    inputs: Mapping[str, InputSpec]
    outputs: Mapping[str, str]
    params: frozenset[str] | None = None
    validate_params: Callable[[dict[str, Any]], None] | None = None
    key_metric: str | None = None
    model_role: str | None = None
    description: str = ""


_REGISTRY: dict[str, StageKind] = {}
_builtins_loaded = False


def _registry() -> dict[str, StageKind]:
    """The registry, with the built-in kinds added on first use.

    :mod:`.stage_kinds` imports this module for the types, so it is imported here, lazily, rather than
    at the top.
    """
    global _builtins_loaded
    if not _builtins_loaded:
        from .stage_kinds import BUILTIN_KINDS

        for kind in BUILTIN_KINDS:
            _REGISTRY.setdefault(kind.name, kind)
        _builtins_loaded = True
    return _REGISTRY


def register_stage_kind(kind: StageKind, replace: bool = False) -> StageKind:
    """Add a stage kind (tests and plugins). Refuses to replace an existing kind unless ``replace``."""
    registry = _registry()
    if kind.name in registry and not replace:
        raise CalodistillError(f"stage kind {kind.name!r} is already registered")
    registry[kind.name] = kind
    return kind


def unregister_stage_kind(name: str) -> None:
    """Remove a stage kind added with :func:`register_stage_kind` (no-op if absent)."""
    _registry().pop(name, None)


def get_stage_kind(name: str) -> StageKind:
    """The registered kind called ``name``; ``KeyError`` if there is none."""
    return _registry()[name]


def stage_kind_names() -> list[str]:
    """Registered kind names, sorted."""
    return sorted(_registry())
