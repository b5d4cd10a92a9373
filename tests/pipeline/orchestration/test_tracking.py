"""MLflow tracking of a pipeline run: parent + nested stage runs, metrics, params, tags, artifacts,
the registered student with its alias, and ``generate`` from ``models:/NAME@ALIAS``.

One pipeline (fake cheap stages + a stage that writes a tiny real generator) runs twice against a
temporary SQLite store; the checks read the store back with ``MlflowClient``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from calodistill.pipeline.data.store import resolve_tracking_uri
from calodistill.pipeline.orchestration.registry import (
    InputSpec,
    StageContext,
    StageKind,
    StageResult,
    register_stage_kind,
)
from calodistill.pipeline.orchestration.tracking import flatten_params
from tests.pipeline.orchestration import (
    test_runner as fakes,  # registers the fake_* kinds
)
from tests.pipeline.stages.test_generate import make_model_dir


def fake_student(ctx: StageContext) -> StageResult:
    model = ctx.outputs["model"]
    make_model_dir(model, kind="student")
    for epoch in range(3):
        ctx.log_metrics({"kl_student_teacher": 3.0 - epoch}, epoch)
    return StageResult(metrics={"test_nll": 1.0, "kl_student_teacher": 1.0, "sample_ms_per_shower": 0.1,
                                "teacher_sample_ms_per_shower": 10.0, "speedup_vs_teacher": 100.0},
                       artifacts=[(str(model / "preprocessing.json"), "model")], model_output="model",
                       tags={"device": "cpu", "dataset_hash": "abc123"})


register_stage_kind(StageKind("fake_student", fake_student, inputs={"teacher": InputSpec()},
                              outputs={"model": "model"}, key_metric="speedup_vs_teacher", model_role="student"),
                    replace=True)


def fake_fit(ctx: StageContext) -> StageResult:
    """Trains ``epochs`` epochs (1-based, as flows' training loop), resuming from its history "checkpoint".

    With ``hang_after`` (and a ``flag`` file that does not exist yet) it records that epoch in its
    checkpoint, creates the flag and hangs before reporting the epoch: the test kills it there, as
    ``kill -9`` would (so the epoch is in the model's history but was never logged to MLflow).
    """
    model = ctx.outputs["model"]
    checkpoint = ctx.work_dir / "checkpoint.json"
    history = json.loads(checkpoint.read_text()) if checkpoint.exists() else []
    for epoch in range(len(history) + 1, int(ctx.params["epochs"]) + 1):
        metrics = {"train_loss": 1.0 / epoch, "val_loss": 2.0 / epoch}
        history.append({"epoch": float(epoch), **metrics})
        checkpoint.write_text(json.dumps(history))
        flag = Path(ctx.params.get("flag", "/nonexistent"))
        if epoch == ctx.params.get("hang_after") and not flag.exists():
            flag.write_text("hung")
            while True:
                time.sleep(0.1)
        ctx.log_metrics({f"fit_{k}": v for k, v in metrics.items()}, epoch)
    model.mkdir(parents=True, exist_ok=True)
    (model / "history.json").write_text(json.dumps({"fit": history}))
    return StageResult(metrics={"test_nll": 0.5}, model_output="model")


register_stage_kind(StageKind("fake_fit", fake_fit, inputs={"data": InputSpec()}, outputs={"model": "model"},
                              key_metric="test_nll"), replace=True)

REGISTERED = "calodistill-test-student"


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from calodistill.pipeline.orchestration.runner import run_pipeline

    tmp = tmp_path_factory.mktemp("tracking")
    log = tmp / "calls.log"
    data = {
        "name": "tracked",
        "tracking": {"experiment": "calodistill-test", "registered_model": REGISTERED, "alias": "champion",
                     "system_metrics_interval": 1.0},
        "cluster": {"processes": False},
        "stages": {
            "source": {"kind": "fake_source", "params": {"log": str(log), "value": 2}},
            "train": {"kind": "fake_train", "inputs": {"data": "source.data"},
                      "params": {"log": str(log), "epochs": 4, "nested": {"lr": 0.001}}},
            "distill": {"kind": "fake_student", "inputs": {"teacher": "train.model"}},
        },
    }
    dag = tmp / "tracked.yaml"
    dag.write_text(yaml.safe_dump(data))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    first = run_pipeline(dag, run_root=tmp / "runs", tracking_uri=uri)
    second = run_pipeline(dag, run_root=tmp / "runs", tracking_uri=uri)
    return {"uri": uri, "first": first, "second": second, "tmp": tmp}


def _children(client: Any, parent_id: str) -> dict[str, Any]:
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


def test_parent_and_nested_runs_with_metrics(tracked: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracked["uri"])
    first = tracked["first"]
    assert first.ok and first.parent_run_id
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name == "tracked"
    assert parent.data.tags["calodistill.dag"] == "tracked"
    assert "git_commit" in parent.data.tags or "mlflow.source.git.commit" in parent.data.tags
    children = _children(client, first.parent_run_id)
    assert set(children) == {"source", "train", "distill"}
    train = children["train"]
    assert train.info.status == "FINISHED"
    assert train.data.params["epochs"] == "4" and train.data.params["nested.lr"] == "0.001"
    assert train.data.params["input.data"] == "source.data"
    assert train.data.metrics["test_nll"] == pytest.approx(1.3)
    history = client.get_metric_history(train.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    assert sorted(m.value for m in history)[0] == pytest.approx(0.25)
    assert train.data.tags["calodistill.status"] == "ran" and train.data.tags["device"] == "cpu"
    distill = children["distill"]
    for key in ("test_nll", "kl_student_teacher", "sample_ms_per_shower", "teacher_sample_ms_per_shower",
                "speedup_vs_teacher"):
        assert key in distill.data.metrics
    # the final kl value is logged after the per-epoch ones, so it is the run's latest value
    assert distill.data.metrics["kl_student_teacher"] == pytest.approx(1.0)
    assert distill.data.tags["dataset_hash"] == "abc123"
    arts = [a.path for a in client.list_artifacts(distill.info.run_id, "model")]
    assert "model/preprocessing.json" in arts
    assert any(a.path == "dag.yaml" for a in client.list_artifacts(first.parent_run_id))


def test_student_registered_with_alias_and_generate_loads_it(tracked: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    from calodistill.pipeline.data.formats import read_showers
    from calodistill.pipeline.stages.generate import generate_showers_file

    client = MlflowClient(tracked["uri"], registry_uri=tracked["uri"])
    version = client.get_model_version_by_alias(REGISTERED, "champion")
    assert int(version.version) >= 1
    out = tracked["tmp"] / "from_registry.h5"
    res = generate_showers_file(f"models:/{REGISTERED}@champion", 5, "10GeV", out, device="cpu",
                                tracking_uri=tracked["uri"])
    assert res["model_kind"] == "student"
    assert len(read_showers(out)) == 5


def test_pyfunc_predict_returns_showers(tracked: dict[str, Any]) -> None:
    import mlflow
    import pandas as pd
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracked["uri"], registry_uri=tracked["uri"])
    version = client.get_model_version_by_alias(REGISTERED, "champion").version
    uri = client.get_model_version_download_uri(REGISTERED, version)
    model = mlflow.pyfunc.load_model(uri)
    out = model.predict(pd.DataFrame({"incident_energy": [1e4, 5e4, 9e4]}))
    assert out.shape == (3, 504)
    # logged as models from code: a readable source file, no pickled Python object
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tracked["tmp"] / "pyfunc"),
                                                     tracking_uri=tracked["uri"]))
    files = {p.name for p in local.rglob("*") if p.is_file()}
    assert "mlflow_model.py" in files
    assert not any(name.endswith((".pkl", ".pickle")) for name in files), sorted(files)


def test_rerun_logs_skipped_stage_runs(tracked: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracked["uri"])
    second = tracked["second"]
    assert [s.status for s in second.stages] == ["skipped", "skipped", "skipped"]
    assert second.parent_run_id != tracked["first"].parent_run_id
    children = _children(client, second.parent_run_id)
    assert set(children) == {"source", "train", "distill"}
    assert all(r.data.tags["calodistill.status"] == "skipped" for r in children.values())
    assert children["train"].data.metrics["test_nll"] == pytest.approx(1.3)


def test_failed_stage_marks_runs_failed(tracked: dict[str, Any]) -> None:
    from mlflow.tracking import MlflowClient

    from calodistill.pipeline.orchestration.runner import run_pipeline

    tmp = tracked["tmp"]
    data = {"name": "failing", "tracking": {"experiment": "calodistill-test"}, "cluster": {"processes": False},
            "stages": {"source": {"kind": "fake_source", "params": {"log": str(tmp / "f.log")}},
                       "train": {"kind": "fake_train", "inputs": {"data": "source.data"},
                                 "params": {"log": str(tmp / "f.log"), "epochs": 2, "crash_after": 0,
                                            "crash_flag": str(tmp / "f.flag")}}}}
    dag = tmp / "failing.yaml"
    dag.write_text(yaml.safe_dump(data))
    summary = run_pipeline(dag, run_root=tmp / "runs", tracking_uri=tracked["uri"])
    assert not summary.ok
    client = MlflowClient(tracked["uri"])
    assert client.get_run(summary.parent_run_id).info.status == "FAILED"
    train = _children(client, summary.parent_run_id)["train"]
    assert train.info.status == "FAILED"
    assert "simulated crash" in train.data.tags["calodistill.error"]


def test_tracking_uri_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert resolve_tracking_uri() == "sqlite:////elsewhere/x.db"
    assert resolve_tracking_uri("http://host:5000") == "http://host:5000"


def test_flatten_params() -> None:
    flat = flatten_params({"a": 1, "b": {"c": [1, 2], "d": {"e": "x"}}, "f": None})
    assert flat == {"a": "1", "b.c": "[1, 2]", "b.d.e": "x", "f": "null"}


def test_unknown_registered_model_is_a_clear_error(tracked: dict[str, Any]) -> None:
    from calodistill.pipeline.data.store import resolve_model_dir
    from calodistill.pipeline.errors import CalodistillError

    with pytest.raises(CalodistillError, match="--model models:/nope@champion: cannot load from MLflow"):
        resolve_model_dir("models:/nope@champion", tracking_uri=tracked["uri"])


_KILLED_DRIVER = """
import sys
from tests.pipeline.orchestration import test_tracking  # registers the fake kinds
from calodistill.pipeline.orchestration.runner import run_pipeline
run_pipeline(sys.argv[1], run_root=sys.argv[2], tracking_uri=sys.argv[3])
"""


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_kill_9_leaves_no_running_runs_and_the_resumed_stage_logs_every_epoch(tmp_path: Path) -> None:
    """A driver killed with SIGKILL in epoch 3 of 5: the rerun closes its runs as KILLED and the resumed
    stage's run holds epochs 1-5 (1-2 copied from the killed attempt, 3 from the model's history, 4-5 live)."""
    from mlflow.tracking import MlflowClient

    from calodistill.pipeline.orchestration.runner import run_pipeline

    repo = Path(__file__).resolve().parents[3]
    flag = tmp_path / "hung.flag"
    data = {"name": "killed", "tracking": {"experiment": "calodistill-kill"}, "cluster": {"processes": False},
            "stages": {"source": {"kind": "fake_source", "params": {"log": str(tmp_path / "calls.log")}},
                       "fit": {"kind": "fake_fit", "inputs": {"data": "source.data"},
                               "params": {"epochs": 5, "hang_after": 3, "flag": str(flag)}}}}
    dag = tmp_path / "killed.yaml"
    dag.write_text(yaml.safe_dump(data))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)

    def fit_runs() -> list[Any]:
        exp = client.get_experiment_by_name("calodistill-kill")
        return [] if exp is None else client.search_runs([exp.experiment_id], "tags.`calodistill.stage` = 'fit'")

    def first_epochs_logged() -> bool:
        runs = fit_runs()
        return flag.exists() and len(runs) == 1 and \
            len(client.get_metric_history(runs[0].info.run_id, "fit_train_loss")) == 2

    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_DRIVER, str(dag), str(tmp_path / "runs"), uri],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(first_epochs_logged, 120, "the killed run's first two epochs")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    exp_id = client.get_experiment_by_name("calodistill-kill").experiment_id
    stale = client.search_runs([exp_id], "attributes.status = 'RUNNING'")
    killed_fit = fit_runs()[0]
    # The parent and fit are left as a kill leaves them; under load the kill can also land before the
    # finished source stage's run was closed, so that one may be RUNNING too: all must be closed on rerun.
    stale_ids = {r.info.run_id for r in stale}
    assert killed_fit.info.run_id in stale_ids and any("mlflow.parentRunId" not in r.data.tags for r in stale)

    summary = run_pipeline(dag, run_root=tmp_path / "runs", tracking_uri=uri)
    assert summary.ok and summary.status("fit") == "ran"
    assert next(s for s in summary.stages if s.stage == "fit").resumed
    assert client.search_runs([exp_id], "attributes.status = 'RUNNING'") == []
    for run in stale:
        closed = client.get_run(run.info.run_id)
        assert closed.info.status == "KILLED" and closed.data.tags["calodistill.status"] == "killed"
    new_fit = next(r for r in fit_runs() if r.info.run_id != killed_fit.info.run_id)
    assert new_fit.info.status == "FINISHED"
    assert new_fit.data.tags["calodistill.resumed_from_run"] == killed_fit.info.run_id
    for key, first in (("fit_train_loss", 1.0), ("fit_val_loss", 2.0)):
        history = {m.step: m.value for m in client.get_metric_history(new_fit.info.run_id, key)}
        assert sorted(history) == [1, 2, 3, 4, 5], key
        assert history[1] == pytest.approx(first) and history[5] == pytest.approx(first / 5)


def test_history_metrics_are_named_as_the_stages_log_them(tmp_path: Path) -> None:
    from calodistill.pipeline.orchestration.run_recovery import history_metrics

    (tmp_path / "history.json").write_text(json.dumps(
        {"flow1": [{"epoch": 1.0, "val_nll": 3.0}], "teacher": [{"epoch": 1.0, "val_nll": 9.0, "lr": 0.1}]}))
    assert history_metrics(tmp_path) == [(1, {"flow1_val_nll": 3.0}), (1, {"teacher_val_nll": 9.0, "teacher_lr": 0.1})]
    (tmp_path / "history.json").write_text(json.dumps({"student": [{"epoch": 2.0, "val_kl": 0.5}]}))
    assert history_metrics(tmp_path) == [(2, {"distill_val_kl": 0.5})]


_ = fakes
