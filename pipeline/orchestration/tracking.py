"""MLflow tracking of pipeline runs: one parent run per pipeline run, one nested run per stage.

Where the logging happens, and why: every MLflow write is made by the *driver* (the process running
:func:`pipeline.runner.run_pipeline`), never by the Dask workers. Stage functions run on workers and
report per-epoch metrics through their ``log_metrics`` callback, which the worker publishes as a Dask
event (``Worker.log_event``); the driver subscribes to the topic and logs each event on the stage's
nested run as it arrives, so curves grow live in the MLflow UI. When a stage returns, the driver logs
its parameters, final metrics, the full metric history (any step an event missed), tags, artifacts and
models. This gives

- one writer to the SQLite store (plus MLflow's system-metrics thread in the same process): no
  ``database is locked`` races between processes;
- workers that need no access to the tracking store at all: a remote cluster (``--scheduler``) works
  even when the store is a SQLite file on the driver's machine (outputs need a shared filesystem,
  artifacts are read by the driver from the run directory).

System metrics (CPU, memory, disk, network; GPU when ``pynvml`` finds one) are sampled by MLflow's
``SystemMetricsMonitor`` in the driver for the lifetime of each stage run; with the default
LocalCluster the driver and workers share the machine, so these are the stage's machine metrics.

Tracking URI: the ``tracking_uri`` argument, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///<working directory>/mlflow.db``. Artifacts of experiments created here go next to a
SQLite store, in ``mlruns/``. Browse with ``mlflow ui --backend-store-uri sqlite:///mlflow.db``.

Teacher and student are logged as MLflow pyfunc models (``name="teacher"`` / ``"student"``) whose
``predict`` takes a DataFrame with an ``incident_energy`` column (MeV) and returns showers (N, voxels)
in MeV. The student is registered (``tracking.registered_model`` in the DAG) and gets the alias
``tracking.alias`` (default ``champion``), so ``calodistill generate --model models:/NAME@champion`` works.
They are logged as "models from code" (``pipeline/orchestration/mlflow_model.py``), not as a cloudpickled
object, so loading one runs that readable file, which opens the model directory with
:class:`~calodistill.pipeline.data.bundle.ModelBundle` (weights read with ``torch.load(weights_only=True)``).

A run killed without closing its MLflow runs (``kill -9``, a lost machine) leaves them RUNNING: the next
run of the same DAG in the same run directory marks them KILLED (unless the process that owns them is
still alive on this host), and a stage it resumes gets the whole curve: the metric history of the
attempt it continues, and the per-epoch history the model directory keeps (:mod:`.run_recovery`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..data.store import DEFAULT_TRACKING_FILE, resolve_tracking_uri

if TYPE_CHECKING:  # pragma: no cover
    from .dag import DagSpec, StageSpec

__all__ = [
    "DEFAULT_TRACKING_FILE",
    "PipelineTracker",
    "ShowerGeneratorModel",
    "flatten_params",
    "git_commit",
    "resolve_tracking_uri",
]

logger = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):])
    return None


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested parameters to ``a.b.c`` keys with string values (MLflow params)."""
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            flat[name] = text[:_MAX_PARAM_LEN]
    return flat


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the git checkout containing ``path`` (default: this package), or None."""
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _driver_device() -> str:
    from ...flows.device import describe_device

    return describe_device(None)


try:
    import mlflow.pyfunc as _pyfunc

    _PythonModel: type = _pyfunc.PythonModel
except ImportError:  # pragma: no cover
    _PythonModel = object


class ShowerGeneratorModel(_PythonModel):  # type: ignore[misc,valid-type]
    """MLflow pyfunc wrapper of a model directory (Flow I + teacher or student).

    ``predict`` takes a DataFrame with an ``incident_energy`` column in MeV (or a 1-D array) and returns
    generated showers, float32 (N, voxels) in MeV, sampled on CUDA when present.
    """

    def load_context(self, context: Any) -> None:
        """Open the ``model_dir`` artifact (:class:`~calodistill.pipeline.data.bundle.ModelBundle`)."""
        from ..data.bundle import ModelBundle

        self.generator = ModelBundle.open(Path(context.artifacts["model_dir"])).generator()

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> np.ndarray:
        """Sample one shower per incident energy (MeV).

        ``model_input`` is annotated ``pd.DataFrame``, a type MLflow takes no schema from: the explicit
        signature the pipeline logs stays the model's schema (and MLflow does not warn about a missing hint).
        """
        if hasattr(model_input, "columns"):
            energies = np.asarray(model_input["incident_energy"], dtype=np.float64)
        else:
            energies = np.asarray(model_input, dtype=np.float64).reshape(-1)
        params = params or {}
        out = self.generator.sample(energies, batch_size=int(params.get("batch_size", 10_000)))
        return np.asarray(out, dtype=np.float32)


class PipelineTracker:
    """Logs a pipeline run to MLflow from the driver (see the module docstring).

    Args:
        dag: the pipeline.
        run_dir: its run directory.
        tracking_uri: MLflow tracking URI (resolved with :func:`resolve_tracking_uri`).
        overrides: the ``--set`` overrides, logged on the parent run.
    """

    def __init__(self, dag: DagSpec, run_dir: Path, tracking_uri: str | None = None,
                 overrides: tuple[str, ...] = ()) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        self.dag = dag
        self.run_dir = run_dir
        self.uri = resolve_tracking_uri(tracking_uri)
        self.overrides = overrides
        db = _sqlite_path(self.uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        self._mlflow = mlflow
        self.client = MlflowClient(tracking_uri=self.uri)
        self.parent_run_id: str | None = None
        self.experiment_id: str | None = None
        self.stage_runs: dict[str, str] = {}
        self._monitors: dict[str, Any] = {}
        self._logged_steps: dict[str, set[tuple[str, int]]] = {}
        self._resumed: set[str] = set()

    # ------------------------------------------------------------------------------------- parent run
    def _experiment(self) -> str:
        name = self.dag.tracking.experiment
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        db = _sqlite_path(self.uri)
        location = (db.parent / "mlruns" / name).resolve().as_uri() if db is not None else None
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # noqa: BLE001 - created concurrently by another run
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def start(self) -> str:
        """Create the parent run; returns its id."""
        self.experiment_id = self._experiment()
        tags = {
            "calodistill.dag": self.dag.name,
            "calodistill.dag_path": str(self.dag.path),
            "calodistill.run_dir": str(self.run_dir.resolve()),
            "calodistill.host": socket.gethostname(),
            "calodistill.pid": str(os.getpid()),
            "device": _driver_device(),
        }
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["git_commit"] = commit
        run = self.client.create_run(self.experiment_id, run_name=self.dag.name, tags=tags)
        self.parent_run_id = run.info.run_id
        self.client.log_param(self.parent_run_id, "dag", self.dag.name)
        self.client.log_param(self.parent_run_id, "overrides", json.dumps(list(self.overrides))[:_MAX_PARAM_LEN])
        self.client.log_param(self.parent_run_id, "stages", ",".join(self.dag.order)[:_MAX_PARAM_LEN])
        with tempfile.TemporaryDirectory() as tmp:
            import yaml

            dag_file = Path(tmp) / "dag.yaml"
            dag_file.write_text(yaml.safe_dump(self.dag.raw, sort_keys=False))
            self.client.log_artifact(self.parent_run_id, str(dag_file))
        logger.info("MLflow: parent run %s in experiment %r (%s)", self.parent_run_id,
                    self.dag.tracking.experiment, self.uri)
        self._safe(self.close_stale_runs)
        return self.parent_run_id

    def finish(self, status: str, summary: dict[str, Any] | None = None) -> None:
        """End the parent run (``FINISHED``, ``FAILED`` or ``KILLED``), logging the summary table."""
        for stage in list(self._monitors):
            self._stop_monitor(stage)
        if self.parent_run_id is None:
            return
        if summary:
            self._safe(self.client.log_dict, self.parent_run_id, summary, "run_summary.json")
        self._safe(self.client.set_terminated, self.parent_run_id, status)

    # ------------------------------------------------------------------------------ stale and resumed
    def close_stale_runs(self) -> list[str]:
        """Mark the runs of this DAG and run directory that a gone process left RUNNING as KILLED.

        See :func:`.run_recovery.close_stale_runs`; returns the ids closed.
        """
        from .run_recovery import close_stale_runs

        assert self.experiment_id is not None
        return close_stale_runs(self.client, self.experiment_id, self.dag.name, self.run_dir,
                                keep=self.parent_run_id)

    def _continue_attempt(self, stage: StageSpec, run_id: str) -> None:
        """Start a resumed stage's run with the metrics of the attempt it continues (the curve's first part)."""
        from .run_recovery import attempt_metrics, previous_attempt

        assert self.experiment_id is not None
        previous = previous_attempt(self.client, self.experiment_id, self.dag.name, self.run_dir, stage.name,
                                    exclude=run_id)
        if previous is None:
            return
        self._safe(self.client.set_tag, run_id, "calodistill.resumed_from_run", previous)
        seen = self._logged_steps[stage.name]
        items = [m for m in attempt_metrics(self.client, previous) if (m.key, int(m.step)) not in seen]
        seen.update((m.key, int(m.step)) for m in items)
        for i in range(0, len(items), 1000):
            self._safe(self.client.log_batch, run_id, metrics=items[i:i + 1000])
        logger.info("MLflow: stage %s continues run %s (%d metric values copied)", stage.name, previous, len(items))

    def _log_model_history(self, stage: StageSpec, model_dir: Path) -> None:
        """Log the epochs of a model directory's training history the stage run does not have yet.

        A resumed training stage reports only the epochs it runs; its ``history.json`` (or last
        checkpoint) holds them all (:func:`.run_recovery.history_metrics`).
        """
        from .run_recovery import history_metrics

        for step, metrics in history_metrics(model_dir):
            self.log_stage_metrics(stage, metrics, step)

    # -------------------------------------------------------------------------------------- stage runs
    def _safe(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tracking must not take the pipeline down
            logger.warning("MLflow: %s failed: %s", getattr(fn, "__name__", fn), " ".join(str(exc).split())[:300])
            return None

    def stage_run(self, stage: StageSpec, monitor: bool = True, resumed: bool = False) -> str:
        """The nested run of ``stage`` (created, with system-metrics monitoring, on first use).

        For a stage that ``resumed`` an interrupted attempt, the new run starts with that attempt's metrics.
        """
        if stage.name in self.stage_runs:
            run_id = self.stage_runs[stage.name]
            if resumed and stage.name not in self._resumed:
                self._resumed.add(stage.name)
                self._safe(self._continue_attempt, stage, run_id)
            return run_id
        assert self.parent_run_id is not None and self.experiment_id is not None
        tags = {
            "mlflow.parentRunId": self.parent_run_id,
            "calodistill.stage": stage.name,
            "calodistill.kind": stage.kind,
            "calodistill.dag": self.dag.name,
            "calodistill.run_dir": str(self.run_dir.resolve()),
        }
        commit = self.client.get_run(self.parent_run_id).data.tags.get("git_commit")
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["git_commit"] = commit
        run = self.client.create_run(self.experiment_id, run_name=stage.name, tags=tags)
        run_id = run.info.run_id
        self.stage_runs[stage.name] = run_id
        self._logged_steps[stage.name] = set()
        params = flatten_params(stage.params)
        for key, value in stage.inputs.items():
            params[f"input.{key}"] = (",".join(map(str, value)) if isinstance(value, tuple) else str(value))[:_MAX_PARAM_LEN]
        if params:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self._safe(self.client.log_batch, run_id, params=items[i:i + 100])
        if monitor:
            self._start_monitor(stage.name, run_id)
        if resumed:
            self._resumed.add(stage.name)
            self._safe(self._continue_attempt, stage, run_id)
        return run_id

    def _start_monitor(self, stage: str, run_id: str) -> None:
        try:
            import psutil  # noqa: F401
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )
        except ImportError:
            return
        try:
            mon = SystemMetricsMonitor(run_id, sampling_interval=self.dag.tracking.system_metrics_interval,
                                       tracking_uri=self.uri)
            mon.start()
            self._monitors[stage] = mon
        except Exception as exc:  # noqa: BLE001
            logger.warning("MLflow: system metrics unavailable: %s", exc)

    def _stop_monitor(self, stage: str) -> None:
        mon = self._monitors.pop(stage, None)
        if mon is not None:
            self._safe(mon.finish)

    def log_stage_metrics(self, stage: StageSpec, metrics: Mapping[str, float], step: int) -> None:
        """Log one ``log_metrics(metrics, step)`` call of a running stage."""
        from mlflow.entities import Metric

        run_id = self.stage_run(stage)
        seen = self._logged_steps[stage.name]
        ts = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            if (key, int(step)) in seen:
                continue
            try:
                items.append(Metric(str(key), float(value), ts, int(step)))
            except (TypeError, ValueError):
                continue
            seen.add((key, int(step)))
        if items:
            self._safe(self.client.log_batch, run_id, metrics=items)

    def stage_finished(self, stage: StageSpec, outcome: Mapping[str, Any], model_role: str | None) -> None:
        """Log a finished (or skipped) stage: history, final metrics, tags, artifacts, model; end the run."""
        from mlflow.entities import Metric

        resumed = bool(outcome.get("resumed"))
        run_id = self.stage_run(stage, monitor=outcome.get("status") == "ran", resumed=resumed)
        for step, metrics in outcome.get("history", []):
            self.log_stage_metrics(stage, metrics, int(step))
        model_out = outcome.get("model_output")
        if resumed and model_out and model_out in outcome.get("outputs", {}):
            self._safe(self._log_model_history, stage, Path(outcome["outputs"][model_out]))
        seen = self._logged_steps[stage.name]
        last_step: dict[str, int] = {}
        for key, step in seen:
            last_step[key] = max(step, last_step.get(key, -1))
        ts = int(time.time() * 1000)
        final = [Metric(k, float(v), ts, last_step.get(k, -1) + 1) for k, v in outcome.get("metrics", {}).items()]
        final.append(Metric("stage_seconds", float(outcome.get("duration_s", 0.0)), ts, 0))
        self._safe(self.client.log_batch, run_id, metrics=final)
        tags = {str(k): str(v)[:5000] for k, v in outcome.get("tags", {}).items()}
        tags["calodistill.status"] = str(outcome.get("status"))
        tags["calodistill.stage_key"] = str(outcome.get("key", ""))
        tags["calodistill.stage_dir"] = str(outcome.get("stage_dir", ""))
        if outcome.get("status") == "skipped" and outcome.get("original_run_id"):
            tags["calodistill.original_run_id"] = str(outcome["original_run_id"])
        for k, v in tags.items():
            self._safe(self.client.set_tag, run_id, k, v)
        if outcome.get("status") == "ran":
            for path, artifact_dir in outcome.get("artifacts", []):
                p = Path(path)
                if p.is_file():
                    self._safe(self.client.log_artifact, run_id, str(p), artifact_dir or None)
                elif p.is_dir():
                    self._safe(self.client.log_artifacts, run_id, str(p), artifact_dir or None)
            model_out = outcome.get("model_output")
            if model_role and model_out:
                self._safe(self._log_model, stage, run_id, model_role, Path(outcome["outputs"][model_out]))
        self._stop_monitor(stage.name)
        self._safe(self.client.set_terminated, run_id, "FINISHED")

    def stage_failed(self, stage: StageSpec, error: str, status: str = "FAILED") -> None:
        """Mark the stage's run failed (created if the stage never reported in) with the error as a tag."""
        run_id = self.stage_run(stage, monitor=False)
        self._safe(self.client.set_tag, run_id, "calodistill.status", "failed" if status == "FAILED" else "killed")
        self._safe(self.client.set_tag, run_id, "calodistill.error", error[:5000])
        self._stop_monitor(stage.name)
        self._safe(self.client.set_terminated, run_id, status)

    # ------------------------------------------------------------------------------------------ models
    def _log_model(self, stage: StageSpec, run_id: str, role: str, model_dir: Path) -> None:
        """Log ``model_dir`` (without training checkpoints) as a pyfunc model; register the student.

        With a signature and a one-shower input example (which MLflow checks by loading the logged model
        and sampling it once); what MLflow prints meanwhile goes to the log (:func:`_output_to_log`).
        Role ``onnx``: ``model_dir`` is an exported ``.onnx`` file (:mod:`.onnx_registry`).
        """
        from mlflow.models import infer_signature

        mlflow = self._mlflow
        if role == "onnx":  # an exported sampler (a file): the onnx flavour, registered as <student>-onnx
            from .onnx_registry import log_onnx_model

            log_onnx_model(self.client, self.uri, run_id, model_dir, self.dag.tracking.registered_model,
                           self.dag.tracking.alias, _output_to_log)
            return
        n_voxels = _model_voxels(model_dir)
        example = pd.DataFrame({"incident_energy": np.array([10_000.0])})
        signature = infer_signature(example, np.zeros((1, n_voxels), dtype=np.float32))
        registered = self.dag.tracking.registered_model if role == "student" else None
        with tempfile.TemporaryDirectory() as tmp:
            staged = Path(tmp) / "model_dir"
            shutil.copytree(model_dir, staged, ignore=shutil.ignore_patterns("checkpoints", "_*", "*.tmp*"))
            previous = mlflow.get_tracking_uri()
            mlflow.set_tracking_uri(self.uri)
            try:
                with mlflow.start_run(run_id=run_id), _output_to_log(f"log_model({role})"):
                    info = mlflow.pyfunc.log_model(
                        name=role,
                        python_model=str(Path(__file__).with_name("mlflow_model.py")),  # models from code
                        artifacts={"model_dir": str(staged)},
                        signature=signature,
                        input_example=example,
                        pip_requirements=_pip_requirements(),
                        registered_model_name=registered,
                    )
            finally:
                mlflow.set_tracking_uri(previous)
        self.client.set_tag(run_id, f"{role}_model_uri", info.model_uri)
        if registered:
            version = getattr(info, "registered_model_version", None)
            if version is None:
                versions = self.client.search_model_versions(f"name='{registered}'")
                version = max(int(v.version) for v in versions)
            self.client.set_registered_model_alias(registered, self.dag.tracking.alias, str(version))
            self.client.set_tag(run_id, "registered_model", f"models:/{registered}@{self.dag.tracking.alias}")
            logger.info("MLflow: registered student as models:/%s@%s (version %s)", registered,
                        self.dag.tracking.alias, version)


@contextlib.contextmanager
def _output_to_log(what: str) -> Iterator[None]:
    """Collect what is written to stdout/stderr meanwhile (MLflow's ``Successfully registered model``,
    download bars) and log it at INFO instead of letting it reach the terminal."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    finally:
        lines = [" ".join(line.split("\r")[-1].split()) for line in buffer.getvalue().splitlines()]
        text = "; ".join(line for line in lines if line)
        if text:
            logger.info("MLflow %s: %s", what, text[:2000])


def _model_voxels(model_dir: Path) -> int:
    """Number of voxels of a model directory (from its preprocessing; no weights are loaded)."""
    from ..data.bundle import ModelBundle

    return ModelBundle.open(model_dir).n_voxels


def _pip_requirements() -> list[str]:
    from importlib import metadata

    reqs = []
    for dist in ("torch", "nflows", "numpy", "pandas", "mlflow"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs
