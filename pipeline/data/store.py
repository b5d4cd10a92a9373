"""The MLflow store, read side: the tracking URI, model URIs resolved to local model directories, and
finished pipeline runs found again.

``models:/NAME@ALIAS`` (and ``runs:/``, logged model ids, local directories) is resolved here and
nowhere else; :class:`~calodistill.pipeline.data.bundle.ModelBundle` opens what it finds. Writing to the
store (runs, metrics, models) is :mod:`calodistill.pipeline.orchestration.tracking`'s job.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CalodistillError

__all__ = [
    "DEFAULT_TRACKING_FILE",
    "check_store_exists",
    "local_store_path",
    "PipelineRun",
    "find_pipeline_run",
    "is_model_dir",
    "resolve_model_dir",
    "resolve_tracking_uri",
]

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_FILE = "mlflow.db"


def resolve_tracking_uri(tracking_uri: str | None = None) -> str:
    """The tracking URI: the argument, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///$PWD/mlflow.db``."""
    if tracking_uri:
        return tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path.cwd() / DEFAULT_TRACKING_FILE).resolve()}"


_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def local_store_path(uri: str) -> Path | None:
    """The file or directory a local tracking URI names (``sqlite:///...``, ``file:...``, a plain path);
    None for remote stores (``http(s)://``, databases) and in-memory SQLite."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):].split("?", 1)[0])
    if uri.startswith("file:"):
        return Path(re.sub(r"^file:(//)?", "", uri))
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri) or uri in ("databricks", "databricks-uc", "uc"):
        return None
    return Path(uri)


def check_store_exists(uri: str, what: str) -> None:
    """Refuse to open a local tracking store that does not exist, for reading (MLflow would create an
    empty one: an empty ``mlflow.db`` left behind by a failed lookup).

    Args:
        uri: the tracking URI.
        what: what was being looked up, to start the message (``--model models:/m@champion``).
    """
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise CalodistillError(f"{what}: no MLflow tracking store at {path} (run a pipeline first, or pass "
                               "--tracking-uri / set MLFLOW_TRACKING_URI)")


def is_model_dir(path: Path, flow2_only: bool = False) -> bool:
    """Whether ``path`` holds a model: preprocessing, Flow I and a teacher or student.

    With ``flow2_only``, a teacher or student flow file alone is enough (the benchmark times Flow II only).
    """
    flow2 = (path / "student.pt").is_file() or (path / "teacher.pt").is_file()
    if flow2_only:
        return flow2
    return (path / "preprocessing.json").is_file() and (path / "flow1.pt").is_file() and flow2


def resolve_model_dir(model: str, cache_dir: Path | None = None, tracking_uri: str | None = None,
                      flow2_only: bool = False, label: str = "--model") -> Path:
    """A local model directory for ``model`` (a directory, a logged pyfunc model directory, or an MLflow URI).

    Args:
        model: a directory, ``file:`` path or MLflow model URI (``models:/NAME@ALIAS``, ``runs:/...``).
        cache_dir: where a URI's model is downloaded (default: a new temporary directory).
        tracking_uri: MLflow tracking and registry URI (see :func:`resolve_tracking_uri`).
        flow2_only: accept a directory holding only ``teacher.pt`` and/or ``student.pt``.
        label: how errors name the model (the command-line option it came from).

    Raises:
        CalodistillError: ``<label> <model>: ...`` when it cannot be found or is not a model.
    """
    if _URI_RE.match(model) and not model.startswith("file:"):
        uri = resolve_tracking_uri(tracking_uri)
        check_store_exists(uri, f"{label} {model}")
        dst = Path(cache_dir or tempfile.mkdtemp(prefix="calodistill-model-"))
        try:
            local = _download_model(model, dst, uri)
        except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; the user needs one line
            if cache_dir is None:
                shutil.rmtree(dst, ignore_errors=True)
            raise CalodistillError(f"{label} {model}: cannot load from MLflow ({uri}): "
                                   f"{' '.join(str(exc).split())[:300]}") from None
        path = local
    else:
        path = Path(model[5:] if model.startswith("file:") else model).expanduser()
        if not path.exists():
            raise CalodistillError(f"{label} {model}: no such model directory")
    logged = sorted(p for p in (path / "artifacts").glob("*") if p.name != "model_dir") if path.is_dir() else []
    for candidate in (path, path / "artifacts" / "model_dir", path / "model_dir", path / "model", *logged):
        if candidate.is_dir() and is_model_dir(candidate, flow2_only):
            return candidate
    if flow2_only:
        raise CalodistillError(f"{label} {model}: no teacher.pt or student.pt found")
    raise CalodistillError(f"{label} {model}: not a model directory (needs preprocessing.json, flow1.pt and "
                           "student.pt or teacher.pt)")


def _download_model(model: str, dst: Path, uri: str) -> Path:
    """Download an MLflow model URI using ``uri`` as tracking and registry store (no global state)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if model.startswith("models:/"):
        rest = model[len("models:/"):].strip("/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
            location = client.get_model_version_download_uri(name, version)
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
            if version == "latest":
                version = str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
            location = client.get_model_version_download_uri(name, version)
        else:
            location = client.get_logged_model(rest).artifact_location
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(dst)))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(dst), tracking_uri=uri))


@dataclass
class PipelineRun:
    """Where a finished pipeline run left its outputs (read back from MLflow and the stage markers).

    Attributes:
        run_id: the parent MLflow run.
        name: the DAG name.
        stages: stage name → ``{"kind", "run_id", "stage_dir", "outputs": {name: Path}, "metrics", "tags"}``.
    """

    run_id: str
    name: str
    stages: dict[str, dict[str, Any]]

    def output(self, kind: str, name: str) -> Path | None:
        """The output ``name`` of the first stage of ``kind`` that has it on this machine, else None."""
        for info in self.stages.values():
            path = info["outputs"].get(name) if info["kind"] == kind else None
            if path is not None and Path(path).exists():
                return Path(path)
        return None

    @property
    def dataset_dir(self) -> Path | None:
        """The ingested dataset (its ``test`` split is the reference)."""
        return self.output("ingest", "dataset")

    @property
    def teacher_dir(self) -> Path | None:
        return self.output("train_teacher", "model")

    @property
    def student_dir(self) -> Path | None:
        return self.output("distill", "model")

    @property
    def generated(self) -> dict[str, Path]:
        """Generated shower files by label (the file stem: ``teacher``, ``student``)."""
        out = {}
        for info in self.stages.values():
            path = info["outputs"].get("showers") if info["kind"] == "generate" else None
            if path is not None and Path(path).is_file():
                out[Path(path).stem] = Path(path)
        return out

    def metrics(self, kind: str) -> dict[str, float]:
        """Final metrics of the first stage of ``kind`` (e.g. ``"evaluate"``)."""
        return next((dict(i["metrics"]) for i in self.stages.values() if i["kind"] == kind), {})


def find_pipeline_run(
    run_id: str | None = None, tracking_uri: str | None = None, experiment: str = "calodistill"
) -> PipelineRun:
    """Locate a finished pipeline run in MLflow: ``run_id``, or the latest finished one that has a
    teacher and a student.

    Model directories that are not on this machine (a remote run) are downloaded from the MLflow models
    logged by the run (tags ``teacher_model_uri`` / ``student_model_uri``).

    Args:
        run_id: the parent run id (None: the latest finished pipeline run with teacher and student).
        tracking_uri: MLflow tracking URI (default: ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).
        experiment: the MLflow experiment of the pipeline runs.
    """
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    check_store_exists(uri, f"pipeline run {run_id or '(latest)'}")
    client = MlflowClient(uri)
    if run_id is None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise CalodistillError(f"{uri}: no MLflow experiment {experiment!r}; run a pipeline first")
        candidates = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                        order_by=["attributes.start_time DESC"], max_results=200)
        parents = [r for r in candidates if "mlflow.parentRunId" not in r.data.tags and "calodistill.dag" in r.data.tags]
        for parent in parents:
            run = _pipeline_run(client, parent)
            kinds = {i["kind"] for i in run.stages.values()}
            if {"train_teacher", "distill"} <= kinds:
                return run
        raise CalodistillError(f"{uri}: no finished pipeline run with a teacher and a student in {experiment!r}")
    try:
        parent = client.get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - MLflow raises its own exception types
        raise CalodistillError(f"{uri}: no MLflow run {run_id!r} ({' '.join(str(exc).split())[:200]})") from exc
    return _pipeline_run(client, parent)


def _pipeline_run(client: Any, parent: Any) -> PipelineRun:
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    stages: dict[str, dict[str, Any]] = {}
    for child in children:
        tags = child.data.tags
        name = tags.get("calodistill.stage", child.info.run_name)
        stage_dir = Path(tags["calodistill.stage_dir"]) if tags.get("calodistill.stage_dir") else None
        outputs: dict[str, Path] = {}
        marker = stage_dir / "_COMPLETE.json" if stage_dir is not None else None
        if marker is not None and marker.is_file():
            try:
                recorded = json.loads(marker.read_text()).get("outputs", {})
                outputs = {k: Path(v["path"]) for k, v in recorded.items() if isinstance(v, dict) and "path" in v}
            except (OSError, ValueError):
                outputs = {}
        for role in ("teacher", "student"):
            model_uri = tags.get(f"{role}_model_uri")
            if model_uri and not (outputs.get("model") and outputs["model"].exists()):
                outputs["model"] = _download_model_dir(model_uri)
        stages[name] = {"kind": tags.get("calodistill.kind", ""), "run_id": child.info.run_id,
                        "stage_dir": stage_dir, "outputs": outputs, "metrics": dict(child.data.metrics), "tags": tags}
    return PipelineRun(parent.info.run_id, parent.data.tags.get("calodistill.dag", parent.info.run_name), stages)


def _download_model_dir(model_uri: str) -> Path:
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    found = sorted(p.parent for p in local.rglob("preprocessing.json"))
    if not found:
        raise CalodistillError(f"{model_uri}: no model directory (preprocessing.json) in the logged model")
    return found[0]
