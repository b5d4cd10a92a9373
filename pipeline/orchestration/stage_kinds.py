"""The built-in stage kinds: adapters from a DAG stage's context to one call of a stage function.

Each adapter turns a :class:`~.registry.StageContext` (resolved inputs, outputs inside the stage
directory, parameters, a ``log_metrics`` callback) into a call and returns a
:class:`~.registry.StageResult`. The heavy libraries are imported inside the adapters, so parsing a DAG
stays fast.

============== ================================================ =====================================
kind           calls                                            outputs
============== ================================================ =====================================
ingest         :func:`~..data.ingest.ingest_showers`            ``dataset`` (Parquet dataset dir)
train_teacher  :func:`~..stages.train_teacher.train_teacher`    ``model`` (preprocessing, Flow I, MAF)
distill        :func:`~..stages.distill.distill_student`        ``model`` (preprocessing, Flow I, IAF)
                + student/teacher sampling time per shower
generate       :func:`~..stages.generate.generate_showers_file` ``showers`` (HDF5 or Parquet file)
evaluate       :func:`~..stages.evaluate.evaluate_showers`      ``report`` (metrics JSON, plots)
bench          :func:`~..stages.bench.run_bench`                ``results`` (JSON + markdown)
export         :func:`~..stages.export.export_onnx`             ``onnx`` (the student sampler, ONNX)
============== ================================================ =====================================
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..config import build_config
from ..errors import CalodistillError
from ..metrics.timing import time_sampling
from .registry import InputSpec, StageContext, StageKind, StageResult

__all__ = ["BUILTIN_KINDS"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _seceded() -> Iterator[None]:
    """Inside a Dask worker task, leave the worker's thread pool while fanning out sub-tasks.

    A stage that submits work to the cluster it runs on (ingest, sharded generation) would otherwise
    hold a worker thread while waiting for its own sub-tasks: with one worker that can deadlock.
    """
    try:
        from distributed import rejoin, secede
        from distributed.worker import get_worker

        get_worker()
    except (ImportError, ValueError):
        yield
        return
    secede()
    try:
        yield
    finally:
        rejoin()


def _call_with_supported(func: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Call ``func`` with the keyword arguments its signature accepts (extra optional ones are dropped)."""
    sig = inspect.signature(func)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return func(**kwargs)
    accepted = {k: v for k, v in kwargs.items() if k in sig.parameters}
    dropped = sorted(set(kwargs) - set(accepted))
    if dropped:
        logger.debug("%s does not take %s", getattr(func, "__name__", func), ", ".join(dropped))
    return func(**accepted)


def _float_metrics(result: Mapping[str, Any] | None) -> dict[str, float]:
    """Keep the finite numeric entries of a stage function's summary."""
    out: dict[str, float] = {}
    for key, value in (result or {}).items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int | float) and math.isfinite(float(value)):
            out[str(key)] = float(value)
    return out


def _device_tag(device: str | None) -> str:
    from ...flows.device import describe_device

    return describe_device(device)


def _dataset_hash(path: Path) -> str | None:
    try:
        from ..data.dataset import dataset_hash

        return str(dataset_hash(path))
    except Exception as exc:  # noqa: BLE001 - a tag is best effort
        logger.debug("dataset hash of %s unavailable: %s", path, exc)
        return None


def _small_files(directory: Path, max_bytes: int = 5_000_000, patterns: tuple[str, ...] = ("*.json",)) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        files.extend(p for p in sorted(directory.glob(pattern)) if p.is_file() and p.stat().st_size <= max_bytes)
    return files


def _model_artifacts(model_dir: Path) -> list[tuple[str, str]]:
    """Preprocessing state, configs and metric histories (small JSON files) and the checkpoints."""
    arts = [(str(p), "model") for p in _small_files(model_dir, patterns=("*.json", "*.yaml", "*.md"))]
    ckpt = model_dir / "checkpoints"
    if ckpt.is_dir():
        best = sorted(ckpt.rglob("*best*")) or sorted(ckpt.rglob("*.pt"))
        for p in best:
            if p.is_file() and p.stat().st_size < 500_000_000:
                rel = p.parent.relative_to(ckpt)
                arts.append((str(p), "checkpoints" if str(rel) == "." else f"checkpoints/{rel.as_posix()}"))
    return arts


def _split_device(params: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    config = dict(params)
    device = config.pop("device", None)
    return (str(device) if device else None), config


def _validate_config(config_class: str, reserved: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    """A ``validate_params`` building the stage's typed config (``module.Class``), reserved keys removed."""

    def validate(params: dict[str, Any]) -> None:
        import importlib

        module_name, _, attr = config_class.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):  # not built yet: the call will tell
            return
        build_config(cls, ({k: v for k, v in params.items() if k not in reserved}, "params"))

    return validate


def _validate_signature_params(func_path: str, reserved: tuple[str, ...]) -> Callable[[dict[str, Any]], None]:
    """A ``validate_params`` that accepts the keyword arguments of a stage function (imported lazily)."""

    def validate(params: dict[str, Any]) -> None:
        module_name, _, attr = func_path.rpartition(".")
        try:
            import importlib

            func = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):  # not built yet: the call will tell
            return
        accepted = set(inspect.signature(func).parameters) - set(reserved)
        for key in params:
            if key not in accepted:
                raise CalodistillError(f"params: unknown key {key!r} (allowed: {', '.join(sorted(accepted))})")

    return validate


# ---------------------------------------------------------------------------------------------- adapters


_INGEST_PARAMS = frozenset({"geometry", "split_seed", "columns"})


def _run_ingest(ctx: StageContext) -> StageResult:
    from ..data.ingest import ingest_showers

    sources = [str(s) for s in ctx.inputs["sources"]]
    out = ctx.outputs["dataset"]
    with _seceded():
        summary = _call_with_supported(
            ingest_showers,
            sources=sources,
            out_dir=out,
            geometry=ctx.params.get("geometry"),
            columns=ctx.params.get("columns"),
            scheduler=ctx.scheduler,
            overwrite=True,
            split_seed=int(ctx.params.get("split_seed", 0)),
            progress=False,
        )
    tags = {}
    dhash = _dataset_hash(out)
    if dhash:
        tags["dataset_hash"] = dhash
    artifacts = [(str(p), "dataset") for p in _small_files(out)]
    info = {k: v for k, v in (summary or {}).items() if isinstance(v, str | int | float | bool)}
    return StageResult(metrics=_float_metrics(summary), artifacts=artifacts, tags=tags, info=info)


def _run_train_teacher(ctx: StageContext) -> StageResult:
    from ..stages.train_teacher import train_teacher

    device, config = _split_device(ctx.params)
    config.setdefault("progress", False)
    out = ctx.outputs["model"]
    result = train_teacher(
        data_dir=Path(ctx.inputs["data"]), out_dir=out, config=config or None,
        log_metrics=ctx.log_metrics, device=device,
    )
    tags = {"device": _device_tag(device)}
    dhash = _dataset_hash(Path(ctx.inputs["data"]))
    if dhash:
        tags["dataset_hash"] = dhash
    return StageResult(metrics=_float_metrics(result), artifacts=_model_artifacts(out), tags=tags,
                       model_output="model")


_TIMING_KEYS = ("timing_batch", "teacher_timing_batch", "timing_repeats")


def _run_distill(ctx: StageContext) -> StageResult:
    from ..stages.distill import distill_student

    device, config = _split_device(ctx.params)
    timing = {k: config.pop(k) for k in _TIMING_KEYS if k in config}
    config.setdefault("progress", False)
    out = ctx.outputs["model"]
    teacher = Path(ctx.inputs["teacher"])
    result = distill_student(
        teacher_dir=teacher, data_dir=Path(ctx.inputs["data"]), out_dir=out, config=config or None,
        log_metrics=ctx.log_metrics, device=device,
    )
    metrics = _float_metrics(result)
    batch = int(timing.get("timing_batch", 1000))
    teacher_batch = int(timing.get("teacher_timing_batch", 100))
    repeats = int(timing.get("timing_repeats", 3))
    student_ms = time_sampling(out, batch, device=device, repeats=repeats)
    teacher_ms = time_sampling(teacher, teacher_batch, device=device, repeats=1)
    metrics.update(
        sample_ms_per_shower=student_ms,
        teacher_sample_ms_per_shower=teacher_ms,
        speedup_vs_teacher=teacher_ms / student_ms if student_ms > 0 else float("nan"),
    )
    logger.info("student %.4f ms/shower (batch %d), teacher %.3f ms/shower (batch %d): %.0fx",
                student_ms, batch, teacher_ms, teacher_batch, metrics["speedup_vs_teacher"])
    tags = {"device": _device_tag(device), "timing_batch": str(batch), "teacher_timing_batch": str(teacher_batch)}
    dhash = _dataset_hash(Path(ctx.inputs["data"]))
    if dhash:
        tags["dataset_hash"] = dhash
    return StageResult(metrics=metrics, artifacts=_model_artifacts(out), tags=tags, model_output="model",
                       info={"timing_batch": batch, "teacher_timing_batch": teacher_batch})


_GENERATE_PARAMS = frozenset({"n", "energies", "batch_size", "device", "seed", "shard_size", "sample_artifact_n",
                              "allow_extrapolation"})


def _validate_generate(params: dict[str, Any]) -> None:
    from ..stages.generate import parse_energy_spec

    if "n" not in params:
        raise CalodistillError("params: missing key 'n' (number of showers)")
    if not isinstance(params["n"], int) or isinstance(params["n"], bool) or params["n"] <= 0:
        raise CalodistillError(f"params.n: expected a positive integer, got {params['n']!r}")
    try:
        parse_energy_spec(str(params.get("energies", "uniform:1GeV:100GeV")))
    except CalodistillError as exc:
        raise CalodistillError(f"params.energies: {str(exc).removeprefix('--energies: ')}") from None
    if not isinstance(params.get("allow_extrapolation", False), bool):
        raise CalodistillError(f"params.allow_extrapolation: expected true or false, got {params['allow_extrapolation']!r}")


def _run_generate(ctx: StageContext) -> StageResult:
    from ..stages.generate import generate_showers_file, write_sample_artifact

    params = ctx.params
    out = ctx.outputs["showers"]
    kwargs: dict[str, Any] = {
        "model": str(ctx.inputs["model"]),
        "n": int(params["n"]),
        "energies": str(params.get("energies", "uniform:1GeV:100GeV")),
        "out": out,
        "device": params.get("device"),
        "seed": int(params.get("seed", 0)),
        "scheduler": ctx.scheduler,
        "progress": False,
        "parts_dir": ctx.work_dir / "_parts",
        "overwrite": True,  # the stage's own output in its stage directory (a resumed attempt rewrites it)
        "allow_extrapolation": bool(params.get("allow_extrapolation", False)),  # as --allow-extrapolation
    }
    for key in ("batch_size", "shard_size"):
        if key in params:
            kwargs[key] = int(params[key])
    with _seceded():
        summary = generate_showers_file(**kwargs)
    sample = ctx.work_dir / "sample" / f"sample{out.suffix}"
    write_sample_artifact(out, sample, n=int(params.get("sample_artifact_n", 100)))
    return StageResult(
        metrics=_float_metrics(summary),
        artifacts=[(str(sample), "sample")],
        tags={"device": _device_tag(params.get("device"))},
        info={k: v for k, v in summary.items() if isinstance(v, str | int | float)},
    )


_EVALUATE_RESERVED = ("reference", "generated", "out_dir", "teacher_dir", "student_dir")


def _run_evaluate(ctx: StageContext) -> StageResult:
    from ..stages.evaluate import evaluate_showers

    generated: dict[str, Path] = {}
    for key, label in (("teacher_samples", "teacher"), ("student_samples", "student")):
        if key in ctx.inputs:
            generated[label] = Path(ctx.inputs[key])
    for extra in ctx.inputs.get("generated", []) or []:
        generated[Path(extra).stem] = Path(extra)
    out = ctx.outputs["report"]
    params: dict[str, Any] = dict(ctx.params)
    if isinstance(params.get("timing_batch_sizes"), list):
        params["timing_batch_sizes"] = tuple(int(b) for b in params["timing_batch_sizes"])
    tmp_out = out.with_name(f".{out.name}.tmp")
    if tmp_out.exists():
        shutil.rmtree(tmp_out)
    result = evaluate_showers(
        reference=Path(ctx.inputs["reference"]),
        generated=generated,
        out_dir=tmp_out,
        teacher_dir=Path(ctx.inputs["teacher"]) if "teacher" in ctx.inputs else None,
        student_dir=Path(ctx.inputs["student"]) if "student" in ctx.inputs else None,
        **params,
    )
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp_out, out)
    arts: list[tuple[str, str]] = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.suffix.lower() in {".json", ".md", ".png", ".pdf", ".svg", ".csv"}:
            rel = p.parent.relative_to(out)
            arts.append((str(p), "report" if str(rel) == "." else f"report/{rel.as_posix()}"))
    tags = {}
    dhash = _dataset_hash(Path(ctx.inputs["reference"]))
    if dhash:
        tags["dataset_hash"] = dhash
    return StageResult(metrics=_float_metrics(result), artifacts=arts, tags=tags)


_EXPORT_PARAMS = frozenset({"precision", "opset", "groups", "parity_n", "seed"})


def _run_export(ctx: StageContext) -> StageResult:
    from ..stages.export import export_onnx

    out = ctx.outputs["onnx"]
    teacher = ctx.inputs.get("teacher")
    log_prob = ctx.work_dir / "teacher_log_prob.onnx" if teacher is not None else None
    result = export_onnx(str(ctx.inputs["model"]), out, teacher_log_prob=log_prob,
                         teacher=str(teacher) if teacher is not None else None,
                         overwrite=True,  # the stage's own outputs (a resumed attempt rewrites them)
                         **ctx.params)
    meta = result.get("metadata", {})
    tags = {"precision": str(result["precision"]), "geometry": str(meta.get("geometry", ""))}
    info = {k: v for k, v in result.items() if isinstance(v, str | int | float | bool)}
    return StageResult(metrics=_float_metrics(result), artifacts=[(str(log_prob), "onnx")] if log_prob else [],
                       tags=tags, model_output="onnx", info=info)


_BENCH_RESERVED = ("model_dirs", "ingest_scheduler")


def _run_bench(ctx: StageContext) -> StageResult:
    import json

    from ..atomic import atomic_write_text
    from ..stages.bench import run_bench

    out = ctx.outputs["results"]
    out.parent.mkdir(parents=True, exist_ok=True)
    params = dict(ctx.params)
    for key in ("batches", "sections"):
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    model_dirs = [str(ctx.inputs[k]) for k in ("teacher", "student") if k in ctx.inputs]
    with _seceded():
        result = run_bench(model_dirs=model_dirs or None, ingest_scheduler="threads", **params)
    atomic_write_text(out, json.dumps(result, indent=2, default=str) + "\n")
    arts = [(str(out), "bench")]
    if isinstance(result.get("markdown"), str):
        md = out.with_suffix(".md")
        atomic_write_text(md, result["markdown"])
        arts.append((str(md), "bench"))
    metrics = result.get("metrics") if isinstance(result.get("metrics"), dict) else {}
    return StageResult(metrics=_float_metrics(metrics), artifacts=arts,
                       tags={"device": _device_tag(ctx.params.get("device"))})


#: The built-in stage kinds (added to the registry on first use).
BUILTIN_KINDS: tuple[StageKind, ...] = (
    StageKind(
        name="ingest", run=_run_ingest,
        inputs={"sources": InputSpec(required=True, multiple=True,
                                     description="files (CaloGAN/CaloChallenge HDF5, CSV, Parquet) or synth: URIs")},
        outputs={"dataset": "dataset"}, params=_INGEST_PARAMS, key_metric="n_showers",
        description="ingest showers into a partitioned Parquet dataset",
    ),
    StageKind(
        name="train_teacher", run=_run_train_teacher,
        inputs={"data": InputSpec(description="Parquet dataset (ingest output)")},
        outputs={"model": "model"}, key_metric="test_nll", model_role="teacher",
        validate_params=_validate_config("calodistill.pipeline.stages.train_teacher.TeacherTrainConfig", ("device",)),
        description="train Flow I and the MAF teacher",
    ),
    StageKind(
        name="distill", run=_run_distill,
        inputs={"teacher": InputSpec(description="teacher model directory"),
                "data": InputSpec(description="Parquet dataset")},
        outputs={"model": "model"}, key_metric="speedup_vs_teacher", model_role="student",
        validate_params=_validate_config("calodistill.pipeline.stages.distill.DistillStageConfig", ("device", *_TIMING_KEYS)),
        description="distil the IAF student; time student and teacher sampling",
    ),
    StageKind(
        name="generate", run=_run_generate,
        inputs={"model": InputSpec(description="model directory or MLflow model URI")},
        outputs={"showers": "showers.h5"}, params=_GENERATE_PARAMS, validate_params=_validate_generate,
        key_metric="sample_ms_per_shower",
        description="generate showers with Flow I + a Flow II model",
    ),
    StageKind(
        name="evaluate", run=_run_evaluate,
        inputs={"reference": InputSpec(description="reference dataset or file"),
                "teacher_samples": InputSpec(required=False), "student_samples": InputSpec(required=False),
                "generated": InputSpec(required=False, multiple=True),
                "teacher": InputSpec(required=False), "student": InputSpec(required=False)},
        outputs={"report": "report"}, key_metric="auc_low_student",
        validate_params=_validate_signature_params("calodistill.pipeline.stages.evaluate.evaluate_showers", _EVALUATE_RESERVED),
        description="likelihoods, observables, classifier AUCs and plots",
    ),
    StageKind(
        name="bench", run=_run_bench,
        inputs={"teacher": InputSpec(required=False), "student": InputSpec(required=False)},
        outputs={"results": "bench.json"},
        validate_params=_validate_signature_params("calodistill.pipeline.stages.bench.run_bench", _BENCH_RESERVED),
        description="teacher vs student sampling benchmark",
    ),
    StageKind(
        name="export", run=_run_export,
        inputs={"model": InputSpec(description="student model directory or MLflow model URI"),
                "teacher": InputSpec(required=False, description="teacher model: also export its log-likelihood")},
        outputs={"onnx": "student.onnx"}, params=_EXPORT_PARAMS, key_metric="parity_max_rel_diff",
        model_role="onnx", description="export the student as one ONNX graph, checked against torch",
    ),
)
