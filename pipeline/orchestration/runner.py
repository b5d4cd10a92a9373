"""Run a pipeline DAG on Dask, skipping completed stages, resuming interrupted ones, tracked in MLflow.

``calodistill run dags/quickstart.yaml [--scheduler ADDR | --cluster FILE] [--set stage.key=value ...]``

The DAG is loaded and validated (:mod:`.dag`), a Dask client opened (:mod:`.cluster`: a local cluster,
a scheduler address or batch jobs), and every stage
becomes one Dask task (:func:`~.execution.execute_stage`) whose arguments are the tasks of the stages it
reads from, so Dask runs the graph in dependency order and independent stages in parallel. Outputs live
in one run directory per pipeline, ``<runs-dir>/<dag name>/<stage>/``, reused by a rerun. The driver logs
to MLflow (:mod:`.tracking`: a parent run, one nested run per stage, per-epoch metrics streamed from the
workers as Dask events) and returns a summary table: stage, status (ran / skipped / failed / not run),
time, key metric. Every log record of the run, the workers' included, is appended to
``<run dir>/calodistill.log`` (:mod:`calodistill.pipeline.logs`); on a terminal each stage shows one
progress bar (:mod:`.progress`).
"""

from __future__ import annotations

import logging
import queue
import time
import traceback
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CalodistillError
from ..logs import RUN_LOG_NAME, open_run_log
from .cluster import ClusterSpec, dask_client, load_cluster_file
from .dag import load_dag
from .execution import StageTask, execute_stage
from .progress import StageProgress
from .registry import get_stage_kind

__all__ = ["RunSummary", "StageSummary", "run_pipeline"]

logger = logging.getLogger(__name__)


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


def _exception_text(exc: BaseException | None) -> str:
    if exc is None:
        return "cancelled (the Dask scheduler went away, or the run was interrupted); the next run resumes it"
    if type(exc).__name__ == "KilledWorker":  # distributed.scheduler.KilledWorker
        tries = getattr(exc, "allowed_failures", 0) + 1
        return (f"the Dask worker running it died ({tries} attempt{'s' if tries > 1 else ''}: killed, or out of "
                "memory? see the worker logs); the stage is incomplete and the next run resumes it")
    return " ".join(f"{type(exc).__name__}: {exc}".split()) if not isinstance(exc, CalodistillError) \
        else " ".join(str(exc).split())


def _future_exception(fut: Any) -> BaseException | None:
    """The exception of a failed future; None when it was cancelled (``exception()`` then gives None or,
    in some distributed versions, raises CancelledError)."""
    if fut.status == "cancelled":
        return None
    try:
        return fut.exception()
    except Exception as exc:  # noqa: BLE001 - cancelled or lost between the check and the call
        return None if type(exc).__name__ == "CancelledError" else exc


def run_pipeline(
    dag_path: str | Path,
    scheduler: str | None = None,
    overrides: Sequence[str] = (),
    run_root: Path = Path("runs"),
    tracking_uri: str | None = None,
    force: Sequence[str] = (),
    track: bool = True,
    cluster: ClusterSpec | str | Path | None = None,
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
        cluster: a cluster spec or a ``--cluster`` YAML file; wins over the DAG's ``cluster:`` section
            (``scheduler`` wins over both; giving both is an error).

    Returns:
        The run summary (per-stage status, time, key metric; ``ok`` False when a stage failed).

    Raises:
        CalodistillError: invalid DAG or overrides, unknown stage in ``force``, no cluster.
    """
    t_start = time.perf_counter()
    dag = load_dag(dag_path, tuple(overrides))
    if scheduler and cluster is not None:
        raise CalodistillError("give --scheduler or --cluster, not both")
    if isinstance(cluster, str | Path):
        cluster = load_cluster_file(cluster)
    for name in force:
        if name not in dag.stages:
            raise CalodistillError(f"--force {name}: unknown stage (stages: {', '.join(dag.order)})")
    run_dir = (Path(run_root) / dag.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    run_log = open_run_log(run_dir / RUN_LOG_NAME)  # every record of the run, whatever the terminal shows
    summary = RunSummary(dag=dag.name, run_dir=run_dir)

    tracker = None
    if track:
        # tracking imports MLflow (seconds): only when tracking
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
    progress = StageProgress(list(dag.order))

    def handle_event(event: Any) -> None:
        _, msg = event
        name = msg.get("stage")
        if name not in dag.stages:
            return
        if msg.get("type") == "start":
            started_at.setdefault(name, time.perf_counter())
            progress.started(name, bool(msg.get("resumed")))
            if msg.get("resumed"):
                rows[name].resumed = True
                logger.info("stage %s: resuming an interrupted attempt", name)
            else:
                logger.info("stage %s: started", name)
            if tracker is not None and rows[name].status == "not run":
                tracker.stage_run(dag.stages[name], resumed=bool(msg.get("resumed")))
        elif msg.get("type") == "metrics" and rows[name].status == "not run":
            progress.step(name, int(msg.get("step", 0)))
            if tracker is not None:
                tracker.log_stage_metrics(dag.stages[name], msg.get("metrics", {}), int(msg.get("step", 0)))

    def drain() -> None:
        while True:
            try:
                handle_event(events.get_nowait())
            except queue.Empty:
                return

    try:
        with dask_client(dag, scheduler, cluster) as (client, address):
            from ..worker_logs import register_worker_logging

            register_worker_logging(client, run_log.path)
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
                        exc = _future_exception(fut)
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
                            tb = "" if exc is None or type(exc).__name__ == "KilledWorker" else \
                                "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                            logger.error("stage %s failed: %s%s", name, row.error, tb)
                            if tracker is not None:
                                tracker.stage_failed(stage, row.error)
                    progress.finished(name, row.status)
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
        progress.close()
        if tracker is not None:
            tracker.finish(final_status, summary.to_dict())
        run_log.close()
    return summary
