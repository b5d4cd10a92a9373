"""Executing one stage as a Dask task: skip it if complete, resume an interrupted attempt, mark it done.

Each stage's *key* is the SHA-256 of its kind, parameters and inputs (the content hashes of upstream
outputs and input files, literal URIs as text). In the task:

- a completion marker ``_COMPLETE.json`` with the same key, whose outputs are unchanged (same file sizes
  and mtimes, else the same content hash), means *skipped*;
- otherwise any marker is removed first; if ``_ATTEMPT.json`` records the same key the stage directory
  is kept and the stage function resumes from what it finds there (training from its checkpoints,
  sharded generation keeps finished partitions); if not, the directory is emptied;
- after the stage function returns, every declared output must exist; their content hashes are computed
  and the marker is written last, atomically.

So nothing half-written is ever marked complete, and a killed run started again picks up where it stopped
(as does a stage whose worker died: Dask runs it again on another worker, which resumes it). A stage
that requests a GPU runs with ``CUDA_VISIBLE_DEVICES`` naming its worker's own device (:func:`.cluster.claim_gpu`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..errors import CalodistillError
from .cluster import claim_gpu
from .dag import FileInput, LiteralInput, StageRef, StageSpec
from .registry import StageContext, StageResult

__all__ = ["ATTEMPT_MARKER", "COMPLETE_MARKER", "StageTask", "content_hash", "execute_stage"]

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE.json"
ATTEMPT_MARKER = "_ATTEMPT.json"
_HASH_CHUNK = 1 << 22


# ---------------------------------------------------------------------------------------------- hashing


def _iter_files(path: Path) -> Iterator[Path]:
    if path.is_file():
        yield path
    elif path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.is_file() and not p.is_symlink():
                yield p


def content_hash(path: Path) -> str:
    """SHA-256 of a file, or of a directory tree (relative names and contents, in sorted order)."""
    h = hashlib.sha256()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(path)
    for f in _iter_files(path):
        rel = f.relative_to(path).as_posix() if path.is_dir() else ""
        h.update(rel.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def _fingerprint(path: Path) -> list[list[Any]]:
    """Cheap change detector: (relative name, size, mtime_ns) of every file."""
    out: list[list[Any]] = []
    for f in _iter_files(path):
        st = f.stat()
        rel = f.relative_to(path).as_posix() if path.is_dir() else f.name
        out.append([rel, st.st_size, st.st_mtime_ns])
    return out


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------ worker-side task


@dataclass(frozen=True)
class StageTask:
    """What the Dask task of one stage needs (picklable).

    Attributes:
        stage: the stage spec.
        run: the stage kind's adapter.
        stage_dir: the stage directory in the run directory.
        topic: Dask event topic the driver listens on.
        scheduler: address of the cluster (for stages that fan out).
        force: run even when complete.
    """

    stage: StageSpec
    run: Callable[..., Any]
    stage_dir: Path
    topic: str
    scheduler: str | None
    force: bool = False


def _emit(topic: str, msg: dict[str, Any]) -> None:
    """Publish an event to the driver (no-op outside a Dask worker)."""
    try:
        from distributed.worker import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    try:
        worker.log_event(topic, msg)
    except Exception as exc:  # noqa: BLE001 - events are best effort; the history is returned too
        logger.debug("event not sent: %s", exc)


def _stage_key(stage: StageSpec, upstream: Mapping[str, Mapping[str, Any]]) -> str:
    def describe(item: Any) -> Any:
        if isinstance(item, StageRef):
            return {"ref": str(item), "hash": upstream[item.stage]["output_hashes"][item.output]}
        if isinstance(item, FileInput):
            return {"file": item.path.name, "hash": content_hash(item.path)}
        if isinstance(item, LiteralInput):
            return {"literal": item.value}
        raise TypeError(item)  # pragma: no cover

    inputs = {
        k: [describe(i) for i in v] if isinstance(v, tuple) else describe(v) for k, v in sorted(stage.inputs.items())
    }
    payload = {"kind": stage.kind, "params": stage.params, "inputs": inputs, "outputs": stage.outputs}
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _resolve_inputs(stage: StageSpec, upstream: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    def resolve(item: Any) -> Any:
        if isinstance(item, StageRef):
            return Path(upstream[item.stage]["outputs"][item.output])
        if isinstance(item, FileInput):
            return item.path
        return item.value

    return {k: [resolve(i) for i in v] if isinstance(v, tuple) else resolve(v) for k, v in stage.inputs.items()}


def _outputs_intact(marker: Mapping[str, Any], outputs: Mapping[str, Path]) -> bool:
    recorded = marker.get("outputs", {})
    if set(recorded) != set(outputs):
        return False
    for name, path in outputs.items():
        rec = recorded[name]
        if not path.exists() or rec.get("path") != str(path):
            return False
        if _fingerprint(path) == rec.get("fingerprint"):
            continue
        if content_hash(path) != rec.get("hash"):
            return False
    return True


def _clear_dir(stage_dir: Path) -> None:
    if stage_dir.exists():
        for child in stage_dir.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    stage_dir.mkdir(parents=True, exist_ok=True)


_TEMPORARY_RE = re.compile(r"^\..+\.tmp(\d*|-.+)$")


def _remove_temporaries(stage_dir: Path) -> None:
    """Remove the temporary files and directories a killed attempt left (``.NAME.tmp1234``, ``.NAME.HOST-PID-….tmp``).

    Called when an attempt resumes: the attempt it resumes is gone (its worker died or the run was
    stopped), so whatever it was writing will never be renamed into place.
    """
    for path in sorted(stage_dir.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if path.name in (COMPLETE_MARKER, ATTEMPT_MARKER) or not _TEMPORARY_RE.match(path.name):
            continue
        logger.info("removing %s, left by an interrupted attempt", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _ensure_worker_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    for name in ("calodistill",):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)


def _share_cores_between_task_threads() -> None:
    """Give this task's torch an equal share of the worker machine's cores.

    Dask's nanny starts workers with ``OMP_NUM_THREADS=1``, so torch would run one thread even when a
    stage has the machine to itself; with several task threads per worker, all-cores-each would
    oversubscribe (spinning OpenMP barriers). Each task thread gets ``cores // nthreads`` torch threads.
    """
    try:
        from distributed.worker import get_worker

        nthreads = max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return
    import torch

    # affinity and cgroup quota, shared between task threads
    from ...flows.device import torch_threads

    torch.set_num_threads(torch_threads(nthreads))


def _task_gpu(stage: StageSpec) -> str | None:
    """For a stage requesting a GPU, in a Dask worker: the device(s) it runs on (claimed once per process)."""
    if "GPU" not in (stage.dask_resources() or {}):
        return None
    try:
        from distributed.worker import get_worker

        get_worker()
    except (ImportError, ValueError):
        return None  # not in a worker: the caller's environment stands
    return claim_gpu()


def execute_stage(task: StageTask, *upstream_outcomes: Mapping[str, Any]) -> dict[str, Any]:
    """The Dask task of one stage: skip if complete, else run (resuming) and mark complete.

    Args:
        task: the stage and where it runs.
        *upstream_outcomes: the outcomes of the stages it reads from.

    Returns:
        The outcome: ``stage``, ``status`` (``ran``/``skipped``), ``key``, ``outputs`` (name → path),
        ``output_hashes``, ``metrics``, ``history`` (``[step, metrics]`` pairs), ``artifacts``, ``tags``,
        ``model_output``, ``duration_s``, ``stage_dir``.
    """
    _ensure_worker_logging()
    _share_cores_between_task_threads()
    stage = task.stage
    upstream = {o["stage"]: o for o in upstream_outcomes}
    stage_dir = task.stage_dir
    stage_dir.mkdir(parents=True, exist_ok=True)
    outputs = {name: stage_dir / rel for name, rel in stage.outputs.items()}
    key = _stage_key(stage, upstream)
    marker_path = stage_dir / COMPLETE_MARKER
    attempt_path = stage_dir / ATTEMPT_MARKER
    base = {"stage": stage.name, "key": key, "outputs": {k: str(v) for k, v in outputs.items()},
            "stage_dir": str(stage_dir)}

    marker = _read_json(marker_path)
    if marker is not None and not task.force and marker.get("key") == key and _outputs_intact(marker, outputs):
        logger.info("stage %s: complete, skipped (%s)", stage.name, marker_path)
        return {**base, "status": "skipped",
                "output_hashes": {k: v["hash"] for k, v in marker["outputs"].items()},
                "metrics": marker.get("metrics", {}), "history": [], "artifacts": [],
                "tags": marker.get("tags", {}), "model_output": marker.get("model_output"),
                "duration_s": 0.0, "original_duration_s": marker.get("duration_s", 0.0)}
    if marker is not None:
        marker_path.unlink(missing_ok=True)
    attempt = _read_json(attempt_path)
    if attempt is not None and attempt.get("key") == key and not task.force:
        logger.info("stage %s: resuming attempt started %s", stage.name, attempt.get("started_at"))
        _remove_temporaries(stage_dir)
        resumed = True
    else:
        _clear_dir(stage_dir)
        atomic_write_json(attempt_path, {"key": key, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        resumed = False

    history: list[list[Any]] = []

    def log_metrics(metrics: Mapping[str, float], step: int) -> None:
        clean = {}
        for k, v in metrics.items():
            try:
                clean[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
        history.append([int(step), clean])
        _emit(task.topic, {"type": "metrics", "stage": stage.name, "step": int(step), "metrics": clean})

    _emit(task.topic, {"type": "start", "stage": stage.name, "resumed": resumed})
    ctx = StageContext(stage=stage.name, kind=stage.kind, inputs=_resolve_inputs(stage, upstream),
                       outputs=outputs, work_dir=stage_dir, params=dict(stage.params),
                       log_metrics=log_metrics, scheduler=task.scheduler)
    gpu = _task_gpu(stage)
    if gpu is not None:
        logger.info("stage %s: CUDA_VISIBLE_DEVICES=%s", stage.name, gpu)
    t0 = time.perf_counter()
    result = task.run(ctx)
    duration = time.perf_counter() - t0
    if result is None:
        result = StageResult()
    if gpu is not None:
        result.tags = {**result.tags, "cuda_visible_devices": gpu}
    missing = [name for name, path in outputs.items() if not path.exists()]
    if missing:
        raise CalodistillError(f"stage {stage.name!r}: the stage function did not write output(s) "
                               f"{', '.join(missing)} in {stage_dir}")
    out_records = {name: {"path": str(p), "hash": content_hash(p), "fingerprint": _fingerprint(p)}
                   for name, p in outputs.items()}
    metrics = dict(result.metrics)
    atomic_write_json(marker_path, {
        "key": key, "stage": stage.name, "kind": stage.kind, "outputs": out_records, "metrics": metrics,
        "tags": result.tags, "model_output": result.model_output, "info": result.info,
        "duration_s": duration, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "resumed": resumed,
    })
    attempt_path.unlink(missing_ok=True)
    logger.info("stage %s: done in %.1f s", stage.name, duration)
    return {**base, "status": "ran", "output_hashes": {k: v["hash"] for k, v in out_records.items()},
            "metrics": metrics, "history": history, "artifacts": [list(a) for a in result.artifacts],
            "tags": result.tags, "model_output": result.model_output, "duration_s": duration,
            "resumed": resumed}
