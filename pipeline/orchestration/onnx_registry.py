"""An exported ONNX sampler in MLflow: logged with the ``onnx`` flavour and registered beside the student.

The ``export`` stage's ``onnx`` output is logged on the stage's run as the model ``student_onnx``
(``mlflow.onnx.log_model``: the graph itself, its signature ``incident_energy`` (N, 1), ``noise``
(N, L + D) → ``showers`` (N, D), float32) and registered as ``<registered_model>-onnx``, the student's
family: ``models:/calodistill-quickstart-student-onnx@champion`` sits beside
``models:/calodistill-quickstart-student@champion``. Each ONNX version gets the same alias and tags
naming the student version it was exported from, its precision and its parity with torch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ONNX_MODEL_NAME", "ONNX_REGISTRY_SUFFIX", "log_onnx_model", "onnx_registered_name"]

logger = logging.getLogger(__name__)

#: The logged model's name on the export stage's run.
ONNX_MODEL_NAME = "student_onnx"
#: Appended to the student's registered name.
ONNX_REGISTRY_SUFFIX = "-onnx"
_TAGGED = ("precision", "geometry", "particle", "opset", "model_digest", "calodistill_version")


def onnx_registered_name(student_registered: str | None) -> str | None:
    """``<student name>-onnx`` (None when the student is not registered)."""
    return f"{student_registered}{ONNX_REGISTRY_SUFFIX}" if student_registered else None


def _signature(model: Any) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    def spec(value: Any) -> Any:
        dims = tuple(-1 if d.dim_param or not d.dim_value else int(d.dim_value)
                     for d in value.type.tensor_type.shape.dim)
        return TensorSpec(np.dtype(np.float32), dims, value.name)

    return ModelSignature(inputs=Schema([spec(v) for v in model.graph.input]),
                          outputs=Schema([spec(v) for v in model.graph.output]))


def log_onnx_model(client: Any, tracking_uri: str, run_id: str, path: Path, student_registered: str | None,
                   alias: str, quiet: Any) -> str:
    """Log ``path`` on ``run_id`` with the onnx flavour; register it beside the student with ``alias``.

    Args:
        client: an ``MlflowClient`` on the tracking store.
        tracking_uri: the store's URI (set for the call, then restored).
        run_id: the export stage's run.
        path: the exported ``.onnx`` file.
        student_registered: the student's registered name (None: log only, register nothing).
        alias: the alias the student gets (``champion``).
        quiet: a context manager factory taking a label that keeps MLflow's console output in the log.

    Returns:
        The logged model's URI.
    """
    import mlflow
    import mlflow.onnx
    import onnx

    model = onnx.load(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    registered = onnx_registered_name(student_registered)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id), quiet("log_model(onnx)"):
            info = mlflow.onnx.log_model(onnx_model=model, name=ONNX_MODEL_NAME, signature=_signature(model),
                                         registered_model_name=registered, save_as_external_data=False,
                                         onnx_execution_providers=["CPUExecutionProvider"])
    finally:
        mlflow.set_tracking_uri(previous)
    client.set_tag(run_id, "onnx_model_uri", info.model_uri)
    if registered is None:
        return str(info.model_uri)
    version = getattr(info, "registered_model_version", None)
    if version is None:
        version = max(int(v.version) for v in client.search_model_versions(f"name='{registered}'"))
    version = str(version)
    client.set_registered_model_alias(registered, alias, version)
    tags = {f"calodistill.{k}": props[k] for k in _TAGGED if k in props}
    try:
        student = client.get_model_version_by_alias(student_registered, alias)
        tags["calodistill.student_model"] = f"models:/{student_registered}/{student.version}"
    except Exception as exc:  # noqa: BLE001 - the student may not be registered in this store
        logger.debug("no %s@%s to link: %s", student_registered, alias, exc)
    for key, value in tags.items():
        client.set_model_version_tag(registered, version, key, value[:5000])
    client.set_tag(run_id, "registered_onnx_model", f"models:/{registered}@{alias}")
    logger.info("MLflow: registered the ONNX sampler as models:/%s@%s (version %s)", registered, alias, version)
    return str(info.model_uri)
