"""The run loop (pipeline/orchestration/runner.py): the summary, the CLI and a tiny real pipeline.

Cheap fake stage kinds are registered here (the registry is extensible) and used by the other
orchestration tests too; the DAGs run on an in-process LocalCluster (``cluster: {processes: false}``)
so that the fake kinds are visible to the worker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from calodistill.pipeline.orchestration.registry import (
    InputSpec,
    StageContext,
    StageKind,
    StageResult,
    register_stage_kind,
)
from calodistill.pipeline.orchestration.runner import run_pipeline


def _log(ctx: StageContext, event: str) -> None:
    with open(ctx.params["log"], "a") as fh:
        fh.write(json.dumps({"stage": ctx.stage, "event": event}) + "\n")


def logged_calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def fake_source(ctx: StageContext) -> StageResult:
    _log(ctx, "run")
    out = ctx.outputs["data"]
    out.write_text(json.dumps({"value": ctx.params.get("value", 1)}))
    return StageResult(metrics={"n": 10.0})


def fake_train(ctx: StageContext) -> StageResult:
    """Trains for ``epochs`` epochs, one checkpoint per epoch, resuming from the last one.

    ``crash_after`` (with a ``crash_flag`` file that does not exist yet) simulates an interruption:
    the stage writes its checkpoint for that epoch, creates the flag and dies.
    """
    model = ctx.outputs["model"]
    ckpt = ctx.work_dir / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    done = sorted(int(p.stem.split("_")[1]) for p in ckpt.glob("epoch_*.json"))
    start = done[-1] + 1 if done else 0
    _log(ctx, f"start@{start}")
    value = json.loads(Path(ctx.inputs["data"]).read_text())["value"]
    for epoch in range(start, int(ctx.params["epochs"])):
        (ckpt / f"epoch_{epoch}.json").write_text(json.dumps({"epoch": epoch}))
        ctx.log_metrics({"train_loss": 1.0 / (epoch + 1), "val_loss": 2.0 / (epoch + 1)}, epoch)
        flag = ctx.params.get("crash_flag")
        if flag and epoch == ctx.params.get("crash_after") and not Path(flag).exists():
            Path(flag).write_text("crashed")
            model.mkdir(parents=True, exist_ok=True)
            (model / "partial.bin").write_text("half")  # a half-written output
            raise RuntimeError("simulated crash")
    model.mkdir(parents=True, exist_ok=True)
    (model / "weights.json").write_text(json.dumps({"value": value, "epochs": ctx.params["epochs"]}))
    return StageResult(metrics={"test_nll": 1.5 - 0.1 * value}, tags={"device": "cpu"})


def fake_report(ctx: StageContext) -> StageResult:
    _log(ctx, "run")
    if ctx.params.get("fail"):
        raise ValueError("report exploded")
    weights = json.loads((Path(ctx.inputs["model"]) / "weights.json").read_text())
    ctx.outputs["report"].write_text(json.dumps(weights))
    return StageResult(metrics={"score": float(weights["value"])})


def fake_forgetful(ctx: StageContext) -> StageResult:
    return StageResult()  # never writes its declared output


register_stage_kind(StageKind("fake_source", fake_source, inputs={}, outputs={"data": "data.json"},
                              key_metric="n"), replace=True)
register_stage_kind(StageKind("fake_train", fake_train, inputs={"data": InputSpec()}, outputs={"model": "model"},
                              key_metric="test_nll"), replace=True)
register_stage_kind(StageKind("fake_report", fake_report, inputs={"model": InputSpec()},
                              outputs={"report": "report.json"}, key_metric="score"), replace=True)
register_stage_kind(StageKind("fake_forgetful", fake_forgetful, inputs={}, outputs={"thing": "thing.bin"}),
                    replace=True)


def fake_dag(tmp_path: Path, log: Path, **extra: Any) -> Path:
    data = {
        "name": "fake",
        "cluster": {"n_workers": 1, "threads_per_worker": 2, "processes": False},
        "stages": {
            "source": {"kind": "fake_source", "params": {"log": str(log), "value": 2}},
            "train": {"kind": "fake_train", "inputs": {"data": "source.data"},
                      "params": {"log": str(log), "epochs": 4, **extra}},
            "report": {"kind": "fake_report", "inputs": {"model": "train.model"}, "params": {"log": str(log)}},
        },
    }
    path = tmp_path / "fake.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_cli_prints_summary_and_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from calodistill.pipeline.cli import main

    log = tmp_path / "calls.log"
    dag = fake_dag(tmp_path, log)
    rc = main(["run", str(dag), "--runs-dir", str(tmp_path / "runs"), "--no-tracking"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "stage" in out and "train" in out and "test_nll = 1.3" in out
    rc = main(["run", str(dag), "--runs-dir", str(tmp_path / "runs"), "--no-tracking", "--set", "report.fail=true"])
    assert rc == 1
    assert "report exploded" in capsys.readouterr().out
    rc = main(["run", str(dag), "--no-tracking", "--set", "nosuch.x=1"])
    assert rc == 2
    assert "calodistill: error:" in capsys.readouterr().err


TINY_OVERRIDES = [
    'ingest.inputs.sources=["synth:calogan?n=1500&seed=1&spectrum=uniform"]',
    "train_teacher.flow1.train.epochs=1", "train_teacher.teacher.train.epochs=1",
    "train_teacher.teacher.model.hidden_features=32", "train_teacher.flow1.model.hidden_features=16",
    "train_teacher.check_samples=5", "train_teacher.check_batch_size=5",
    "distill.train.epochs=1", "distill.student.hidden_features=32", "distill.distill.kl_samples=50",
    "distill.nll_subset=5", "distill.check_samples=50", "distill.teacher_check_samples=5",
    "distill.timing_batch=100", "distill.teacher_timing_batch=5", "distill.timing_repeats=1",
    "generate_student.n=200", "generate_teacher.n=100", "generate_teacher.batch_size=100",
    "evaluate.max_showers=200", "evaluate.likelihood_max_showers=100", "evaluate.student_nll_max_showers=5",
    "evaluate.kl_samples=50", "evaluate.timing_batch_sizes=[1]", "evaluate.classifier={max_epochs: 2, patience: 1}",
]


@pytest.mark.slow
def test_tiny_real_pipeline_end_to_end(tmp_path: Path) -> None:
    """dags/quickstart.yaml with tiny sizes: every real stage runs, then a rerun skips them all."""
    from mlflow.tracking import MlflowClient

    repo = Path(__file__).resolve().parents[3]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = run_pipeline(repo / "dags" / "quickstart.yaml", overrides=TINY_OVERRIDES, run_root=tmp_path / "runs",
                         tracking_uri=uri)
    assert first.ok, first.format_table()
    distill = first.metrics["distill"]
    for key in ("test_nll", "kl_student_teacher", "sample_ms_per_shower", "teacher_sample_ms_per_shower",
                "speedup_vs_teacher"):
        assert key in distill
    assert distill["speedup_vs_teacher"] > 1.0
    assert {"auc_low_teacher", "auc_low_student", "auc_high_teacher", "auc_high_student",
            "auc_baseline"} <= set(first.metrics["evaluate"])
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_model_version_by_alias("calodistill-quickstart-student", "champion")
    second = run_pipeline(repo / "dags" / "quickstart.yaml", overrides=TINY_OVERRIDES, run_root=tmp_path / "runs",
                          tracking_uri=uri)
    assert all(s.status == "skipped" for s in second.stages)


def test_worker_death_and_cancellation_are_one_line_messages() -> None:
    """What the summary says of a stage whose workers all died (KilledWorker) or whose task was cancelled."""
    from distributed.scheduler import KilledWorker

    from calodistill.pipeline.orchestration.runner import _exception_text

    class _Worker:
        address = "tcp://127.0.0.1:1"

    text = _exception_text(KilledWorker("train-1234", _Worker(), 3))
    assert text.startswith("the Dask worker running it died (4 attempts: killed, or out of memory?")
    assert "next run resumes it" in text and "\n" not in text
    assert _exception_text(None).startswith("cancelled (the Dask scheduler went away")
