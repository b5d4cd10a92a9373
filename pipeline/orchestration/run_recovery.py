"""The MLflow record of an interrupted pipeline run, put right by the next run of the same DAG.

A run killed without closing its MLflow runs (``kill -9``, a lost machine) leaves its parent and stage
runs RUNNING: :func:`close_stale_runs` marks them KILLED, unless the process that owns them is still
alive on this host. A stage that resumes an interrupted attempt reports only the steps it runs, so its
new run is given the attempt's earlier metrics (:func:`previous_attempt`, :func:`attempt_metrics`) and
the per-epoch history its model directory keeps (:func:`history_metrics`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["attempt_metrics", "close_stale_runs", "history_metrics", "previous_attempt", "process_alive"]

logger = logging.getLogger(__name__)

#: Metric prefix of each part of a model directory's ``history.json`` where it is not the part's name
#: (the distill stage logs the student's epochs as ``distill_*``; train_teacher logs ``flow1_*``, ``teacher_*``).
HISTORY_PREFIXES = {"student": "distill"}


def _quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _dag_runs(client: Any, experiment_id: str, dag: str, where: str = "", max_results: int = 1000) -> list[Any]:
    """Runs of the DAG ``dag`` in the experiment, newest first, filtered by ``where`` (MLflow search syntax)."""
    query = f"tags.`calodistill.dag` = {_quoted(dag)}" + (f" and {where}" if where else "")
    return list(client.search_runs([experiment_id], query, max_results=max_results,
                                   order_by=["attributes.start_time DESC"]))


def _run_dir_of(client: Any, run: Any, parents: dict[str, Any]) -> str | None:
    """The run directory a parent or stage run belongs to (a stage run's own tag, else its parent's)."""
    tags = run.data.tags
    if "calodistill.run_dir" in tags:
        return tags["calodistill.run_dir"]
    parent_id = tags.get("mlflow.parentRunId")
    if parent_id is None:
        return None
    if parent_id not in parents:
        try:
            parents[parent_id] = client.get_run(parent_id)
        except Exception:  # noqa: BLE001 - a deleted parent
            parents[parent_id] = None
    parent = parents[parent_id]
    return None if parent is None else parent.data.tags.get("calodistill.run_dir")


def process_alive(tags: Mapping[str, str]) -> bool:
    """Whether the process a run's ``calodistill.host`` / ``calodistill.pid`` tags name is alive.

    False for this process, for another host (which cannot be asked) and for runs without the tags.
    """
    try:
        pid = int(tags.get("calodistill.pid", ""))
    except ValueError:
        return False
    if tags.get("calodistill.host") != socket.gethostname() or pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _last_activity_ms(run: Any) -> int | None:
    """Time of a run's latest logged metric (ms): the end time of a killed run; None when it logged none."""
    stamps = [int(m.timestamp) for m in (getattr(run.data, "_metric_objs", None) or [])
              if getattr(m, "timestamp", None)]
    return max(stamps) if stamps else None


def close_stale_runs(client: Any, experiment_id: str, dag: str, run_dir: Path, keep: str | None = None) -> list[str]:
    """Mark as KILLED the runs of ``dag`` in ``run_dir`` left RUNNING by a process that is gone.

    A stage run goes with its parent run; a RUNNING stage run whose parent is closed is stale too. Runs
    whose process is alive on this host (:func:`process_alive`) are left alone: another run of the pipeline
    is going on.

    Args:
        client: an ``MlflowClient``.
        experiment_id: the experiment.
        dag: the DAG's name (``calodistill.dag`` tag).
        run_dir: the run directory (``calodistill.run_dir`` tag).
        keep: the calling run's parent run (never closed).

    Returns:
        The ids of the runs closed.
    """
    here = str(Path(run_dir).resolve())
    running = [r for r in _dag_runs(client, experiment_id, dag, "attributes.status = 'RUNNING'")
               if r.info.run_id != keep]
    parents: dict[str, Any] = {r.info.run_id: r for r in running}
    live: set[str] = set()
    stale: list[Any] = []
    for run in running:
        if _run_dir_of(client, run, parents) != here:
            continue
        parent_id = run.data.tags.get("mlflow.parentRunId")
        owner = parents.get(parent_id) if parent_id else run
        if parent_id == keep:
            continue
        if owner is not None and owner.info.status == "RUNNING" and process_alive(owner.data.tags):
            live.add(owner.info.run_id)
            continue
        stale.append(run)
    if live:
        logger.warning("MLflow: run(s) %s of %s still going on (their process is alive): left RUNNING",
                       ", ".join(sorted(live)), dag)
    note = "the process running it ended without closing it (killed?)" + (f"; closed by run {keep}" if keep else "")
    for run in stale:
        run_id = run.info.run_id
        try:
            client.set_tag(run_id, "calodistill.status", "killed")
            if "calodistill.stage" in run.data.tags:
                client.set_tag(run_id, "calodistill.error", note)
            client.set_terminated(run_id, "KILLED", _last_activity_ms(run))
        except Exception as exc:  # noqa: BLE001 - one run that cannot be closed does not stop the others
            logger.warning("MLflow: stale run %s not closed: %s", run_id, " ".join(str(exc).split())[:300])
    if stale:
        logger.info("MLflow: closed %d stale run(s) of %s in %s as KILLED", len(stale), dag, here)
    return [r.info.run_id for r in stale]


def previous_attempt(client: Any, experiment_id: str, dag: str, run_dir: Path, stage: str,
                     exclude: str | None = None) -> str | None:
    """The run of the interrupted (KILLED or FAILED) attempt of ``stage`` that a resumed attempt continues.

    The newest run of the stage in ``run_dir`` other than ``exclude`` and skipped-stage records; None when
    that one finished.
    """
    here = str(Path(run_dir).resolve())
    parents: dict[str, Any] = {}
    for run in _dag_runs(client, experiment_id, dag, f"tags.`calodistill.stage` = {_quoted(stage)}", max_results=50):
        if run.info.run_id == exclude or _run_dir_of(client, run, parents) != here:
            continue
        if run.data.tags.get("calodistill.status") == "skipped":
            continue
        return run.info.run_id if run.info.status in ("KILLED", "FAILED") else None
    return None


def attempt_metrics(client: Any, run_id: str) -> list[Any]:
    """Every value of every metric a run logged (MLflow ``Metric`` objects), system metrics left out."""
    metrics = []
    for key in client.get_run(run_id).data.metrics:
        if not key.startswith("system/"):
            metrics.extend(client.get_metric_history(run_id, key))
    return metrics


def history_metrics(model_dir: Path) -> list[tuple[int, dict[str, float]]]:
    """A model directory's per-epoch training history as ``(epoch, {metric: value})``, named as logged live.

    ``history.json`` holds ``{part: [epoch dicts]}`` (``flow1`` and ``teacher``, or ``student``); a part's
    metrics are logged as ``<prefix>_<key>`` (:data:`HISTORY_PREFIXES`), a flat list's as they are.
    """
    from ..data.history import load_history

    history = load_history(model_dir)
    if not history:
        return []
    parts = history if isinstance(history, dict) else {"": history}
    out: list[tuple[int, dict[str, float]]] = []
    for part, epochs in parts.items():
        if not isinstance(epochs, list):
            continue
        prefix = HISTORY_PREFIXES.get(part, part)
        for entry in epochs:
            if not isinstance(entry, Mapping) or "epoch" not in entry:
                continue
            metrics = {}
            for key, value in entry.items():
                if key == "epoch":
                    continue
                try:
                    metrics[f"{prefix}_{key}" if prefix else str(key)] = float(value)
                except (TypeError, ValueError):
                    continue
            out.append((int(entry["epoch"]), metrics))
    return out
