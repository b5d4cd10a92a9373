"""Run a pipeline DAG on Dask, skipping completed stages, resuming interrupted ones, tracked in MLflow.

``calodistill run dags/quickstart.yaml [--scheduler tcp://HOST:8786] [--set stage.key=value ...]``

How a run goes:

1. The DAG file is loaded and validated (:mod:`pipeline.dag`), overrides applied.
2. A Dask client is opened: a ``distributed.LocalCluster`` (``cluster:`` in the DAG; one worker with two
   threads by default, no dashboard; a ``GPU`` resource per worker when CUDA is present), or the
   cluster at ``--scheduler``. Every stage becomes one Dask task (:func:`execute_stage`) whose
   arguments are the tasks of the stages it reads from, so Dask runs the graph in dependency order and
   independent stages in parallel. Stages with ``gpu: true`` request ``resources={"GPU": 1}``.
3. Outputs live in one run directory per pipeline, ``<runs-dir>/<dag name>/<stage>/``; a rerun of the
   same DAG reuses it. Each stage's *key* is the SHA-256 of its kind, parameters and inputs (the content
   hashes of upstream outputs and input files, literal URIs as text). In the task:

   - a completion marker ``_COMPLETE.json`` with the same key, whose outputs are unchanged (same file
     sizes and mtimes, else the same content hash), means *skipped*;
   - otherwise any marker is removed first; if ``_ATTEMPT.json`` records the same key the stage directory
     is kept and the stage function resumes from what it finds there (training resumes from its
     checkpoints, sharded generation keeps finished partitions); if not, the directory is emptied;
   - after the stage function returns, every declared output must exist; their content hashes are
     computed and the marker is written last, atomically (temporary file + ``os.replace``).

   So nothing half-written is ever marked complete, and a killed run started again picks up where it
   stopped.
4. Tracking: the driver logs everything to MLflow (:mod:`pipeline.tracking`): a parent run, one nested
   run per stage, per-epoch metrics streamed from the workers as Dask events.
5. A summary table: stage, status (ran / skipped / failed / not run), time, key metric.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import shutil
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..errors import CalodistillError
from .dag import DagSpec, FileInput, LiteralInput, StageRef, StageSpec, load_dag

__all__ = [
    "COMPLETE_MARKER",
    "ATTEMPT_MARKER",
    "RunSummary",
    "StageSummary",
    "content_hash",
    "execute_stage",
    "run_pipeline",
]

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


def _ensure_worker_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    for name in ("pipeline", "flows"):
        lg = logging.getLogger(name)
        if lg.level == logging.NOTSET or lg.level > logging.INFO:
            lg.setLevel(logging.INFO)


def _worker_environ() -> dict[str, Any]:
    """Dask config for LocalCluster workers: Dask's environment without ``MALLOC_TRIM_THRESHOLD_``.

    Setting any ``MALLOC_*_`` variable turns off glibc's dynamic mmap threshold, so every large torch
    temporary is mmap'd and page-faulted anew: measured here, one teacher epoch took 38 s (28 s of it in
    the kernel) with Dask's default against 22 s (2 s) without it.
    """
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    return {"distributed.nanny.pre-spawn-environ": env}


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

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores // nthreads))


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
    from .registry import StageContext, StageResult

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
    t0 = time.perf_counter()
    result = task.run(ctx)
    duration = time.perf_counter() - t0
    if result is None:
        result = StageResult()
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


# ------------------------------------------------------------------------------------------- summary


@dataclass
class StageSummary:
    """One row of the summary table."""

    stage: str
    kind: str
    status: str  # ran | skipped | failed | not run
    seconds: float = 0.0
    metric_name: str | None = None
    metric_value: float | None = None
    error: str | None = None
    resumed: bool = False


@dataclass
class RunSummary:
    """The result of :func:`run_pipeline`."""

    dag: str
    run_dir: Path
    stages: list[StageSummary] = field(default_factory=list)
    wall_s: float = 0.0
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no stage failed or was left not run."""
        return all(s.status in ("ran", "skipped") for s in self.stages)

    def status(self, stage: str) -> str:
        """The status of one stage."""
        return next(s.status for s in self.stages if s.stage == stage)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        d = asdict(self)
        d["run_dir"] = str(self.run_dir)
        return d

    def format_table(self) -> str:
        """The summary table (plain text)."""
        rows = [("stage", "kind", "status", "time", "key metric")]
        for s in self.stages:
            metric = ""
            if s.metric_name and s.metric_value is not None:
                metric = f"{s.metric_name} = {s.metric_value:.4g}"
            elif s.error:
                metric = s.error if len(s.error) < 80 else s.error[:77] + "..."
            status = s.status + (" (resumed)" if s.resumed else "")
            rows.append((s.stage, s.kind, status, f"{s.seconds:.1f}s", metric))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = []
        for j, r in enumerate(rows):
            lines.append("  ".join(r[i].ljust(widths[i]) for i in range(4)) + "  " + r[4])
            if j == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 10)
        lines.append(f"total wall time {self.wall_s:.1f}s; outputs in {self.run_dir}")
        if self.parent_run_id:
            lines.append(f"MLflow parent run {self.parent_run_id} ({self.tracking_uri})")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------- driver


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover
        return 0


@contextlib.contextmanager
def _dask_client(dag: DagSpec, scheduler: str | None) -> Iterator[tuple[Any, str]]:
    import dask
    from distributed import Client, LocalCluster

    needs_gpu = any(s.dask_resources() and "GPU" in (s.dask_resources() or {}) for s in dag.stages.values())
    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise CalodistillError(f"--scheduler {scheduler}: cannot connect ({exc})") from exc
        try:
            if needs_gpu:
                workers = client.scheduler_info().get("workers", {}).values()
                if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers):
                    gpu_stages = [s.name for s in dag.stages.values() if s.gpu]
                    raise CalodistillError(f"--scheduler {scheduler}: stage(s) {', '.join(gpu_stages)} request a GPU "
                                           "but no worker has a 'GPU' resource (start workers with "
                                           "--resources GPU=1, or --set STAGE.gpu=false)")
            yield client, scheduler
        finally:
            client.close()
        return
    spec = dag.cluster
    n_gpu = _cuda_devices()
    if needs_gpu and n_gpu == 0:
        gpu_stages = [s.name for s in dag.stages.values() if s.gpu]
        raise CalodistillError(f"{dag.path}: stage(s) {', '.join(gpu_stages)} have gpu: true but no CUDA device "
                               f"was found (use --set {gpu_stages[0]}.gpu=false to run on the CPU)")
    kwargs: dict[str, Any] = {
        "n_workers": spec.n_workers, "threads_per_worker": spec.threads_per_worker,
        "processes": spec.processes, "dashboard_address": None,
    }
    if spec.memory_limit:
        kwargs["memory_limit"] = spec.memory_limit
    if n_gpu:
        kwargs["resources"] = {"GPU": max(1, n_gpu // max(1, spec.n_workers))}
    with contextlib.redirect_stdout(sys.stderr), dask.config.set(_worker_environ()):
        cluster = LocalCluster(**kwargs)
    client = Client(cluster)
    try:
        yield client, cluster.scheduler_address
    finally:
        client.close()
        cluster.close()


def _exception_text(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split()) if not isinstance(exc, CalodistillError) \
        else " ".join(str(exc).split())


def run_pipeline(
    dag_path: str | Path,
    scheduler: str | None = None,
    overrides: Sequence[str] = (),
    run_root: Path = Path("runs"),
    tracking_uri: str | None = None,
    force: Sequence[str] = (),
    track: bool = True,
) -> RunSummary:
    """Run a pipeline end to end.

    Args:
        dag_path: the DAG YAML file.
        scheduler: Dask scheduler address (``tcp://HOST:8786``); None starts a LocalCluster.
        overrides: ``stage.key=value`` overrides.
        run_root: directory holding the run directories (``<run_root>/<dag name>/``).
        tracking_uri: MLflow tracking URI (default: ``MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``).
        force: stage names to run even when complete.
        track: log to MLflow (False: only the run directory and the summary).

    Returns:
        The run summary (per-stage status, time, key metric; ``ok`` False when a stage failed).

    Raises:
        CalodistillError: invalid DAG or overrides, unknown stage in ``force``, no cluster.
    """
    from .registry import get_stage_kind

    t_start = time.perf_counter()
    dag = load_dag(dag_path, tuple(overrides))
    for name in force:
        if name not in dag.stages:
            raise CalodistillError(f"--force {name}: unknown stage (stages: {', '.join(dag.order)})")
    run_dir = (Path(run_root) / dag.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = RunSummary(dag=dag.name, run_dir=run_dir)

    tracker = None
    if track:
        from .tracking import PipelineTracker

        tracker = PipelineTracker(dag, run_dir, tracking_uri=tracking_uri, overrides=tuple(overrides))
        summary.parent_run_id = tracker.start()
        summary.tracking_uri = tracker.uri

    rows = {name: StageSummary(stage=name, kind=dag.stages[name].kind, status="not run",
                               metric_name=get_stage_kind(dag.stages[name].kind).key_metric)
            for name in dag.order}
    summary.stages = [rows[n] for n in dag.order]
    events: queue.Queue[Any] = queue.Queue()
    topic = f"calodistill-{uuid.uuid4().hex}"
    started_at: dict[str, float] = {}
    final_status = "FINISHED"

    def handle_event(event: Any) -> None:
        _, msg = event
        name = msg.get("stage")
        if name not in dag.stages:
            return
        if msg.get("type") == "start":
            started_at.setdefault(name, time.perf_counter())
            if msg.get("resumed"):
                rows[name].resumed = True
                logger.info("stage %s: resuming an interrupted attempt", name)
            else:
                logger.info("stage %s: started", name)
            if tracker is not None and rows[name].status == "not run":
                tracker.stage_run(dag.stages[name])
        elif msg.get("type") == "metrics" and tracker is not None and rows[name].status == "not run":
            tracker.log_stage_metrics(dag.stages[name], msg.get("metrics", {}), int(msg.get("step", 0)))

    def drain() -> None:
        while True:
            try:
                handle_event(events.get_nowait())
            except queue.Empty:
                return

    try:
        with _dask_client(dag, scheduler) as (client, address):
            client.subscribe_topic(topic, events.put)
            futures: dict[str, Any] = {}
            for name in dag.order:
                stage = dag.stages[name]
                kind = get_stage_kind(stage.kind)
                task = StageTask(stage=stage, run=kind.run, stage_dir=run_dir / name, topic=topic,
                                 scheduler=address, force=name in force)
                deps = [futures[u] for u in stage.upstream]
                futures[name] = client.submit(execute_stage, task, *deps, key=f"{name}-{uuid.uuid4().hex[:8]}",
                                              resources=stage.dask_resources(), pure=False, retries=0)
            pending = {f: n for n, f in futures.items()}
            failed: set[str] = set()
            while pending:
                done = {f for f in pending if f.done()}
                if not done:  # poll: stage events are handled between polls
                    time.sleep(0.2)
                drain()
                for name in [n for n in dag.order if futures[n] in done]:
                    fut = futures[name]
                    pending.pop(fut)
                    row = rows[name]
                    stage = dag.stages[name]
                    if fut.status == "finished":
                        outcome = fut.result()
                        drain()
                        row.status = outcome["status"]
                        row.seconds = float(outcome["duration_s"])
                        summary.metrics[name] = dict(outcome.get("metrics", {}))
                        if row.metric_name:
                            row.metric_value = outcome.get("metrics", {}).get(row.metric_name)
                        logger.info("stage %s: %s", name, row.status)
                        if tracker is not None:
                            tracker.stage_finished(stage, outcome, get_stage_kind(stage.kind).model_role)
                    else:
                        exc = fut.exception()
                        blocked = [u for u in stage.upstream if u in failed]
                        failed.add(name)
                        if blocked:
                            row.status = "not run"
                            row.error = f"upstream {', '.join(blocked)} failed"
                        else:
                            row.status = "failed"
                            row.error = _exception_text(exc)
                            if name in started_at:
                                row.seconds = time.perf_counter() - started_at[name]
                            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                            logger.error("stage %s failed: %s\n%s", name, row.error, tb)
                            if tracker is not None:
                                tracker.stage_failed(stage, row.error)
            client.unsubscribe_topic(topic)
        final_status = "FINISHED" if summary.ok else "FAILED"
    except KeyboardInterrupt:
        final_status = "KILLED"
        if tracker is not None:
            for name, row in rows.items():
                if row.status == "not run" and name in tracker.stage_runs:
                    tracker.stage_failed(dag.stages[name], "interrupted", status="KILLED")
        raise
    except BaseException:
        final_status = "FAILED"
        raise
    finally:
        summary.wall_s = time.perf_counter() - t_start
        if tracker is not None:
            tracker.finish(final_status, summary.to_dict())
    return summary


# ----------------------------------------------------------------------------------------------- CLI


