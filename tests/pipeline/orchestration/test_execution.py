"""Stage execution (pipeline/orchestration/execution.py): skip on rerun, stage keys, changed outputs,
resume after interruption, missing outputs and --force, through runs of the fake DAG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.orchestration.execution import ATTEMPT_MARKER, COMPLETE_MARKER, content_hash
from calodistill.pipeline.orchestration.runner import run_pipeline
from tests.pipeline.orchestration.test_runner import fake_dag, logged_calls


def test_runs_then_skips_everything_on_rerun(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    dag = fake_dag(tmp_path, log)
    runs = tmp_path / "runs"
    first = run_pipeline(dag, run_root=runs, track=False)
    assert first.ok
    assert [s.status for s in first.stages] == ["ran", "ran", "ran"]
    assert first.metrics["train"]["test_nll"] == pytest.approx(1.3)
    assert json.loads((runs / "fake" / "report" / "report.json").read_text())["value"] == 2
    for stage in ("source", "train", "report"):
        marker = json.loads((runs / "fake" / stage / COMPLETE_MARKER).read_text())
        assert marker["stage"] == stage
        assert not (runs / "fake" / stage / ATTEMPT_MARKER).exists()
    marker = json.loads((runs / "fake" / "train" / COMPLETE_MARKER).read_text())
    assert marker["outputs"]["model"]["hash"] == content_hash(runs / "fake" / "train" / "model")
    n_calls = len(logged_calls(log))

    second = run_pipeline(dag, run_root=runs, track=False)
    assert [s.status for s in second.stages] == ["skipped", "skipped", "skipped"]
    assert len(logged_calls(log)) == n_calls  # no stage function was called
    assert second.metrics["train"]["test_nll"] == pytest.approx(1.3)  # metrics come from the marker
    assert "skipped" in second.format_table()


def test_changed_param_reruns_that_stage_and_downstream_only(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    dag = fake_dag(tmp_path, log)
    runs = tmp_path / "runs"
    run_pipeline(dag, run_root=runs, track=False)
    third = run_pipeline(dag, run_root=runs, track=False, overrides=["train.epochs=5"])
    assert [s.status for s in third.stages] == ["skipped", "ran", "ran"]
    # a fresh attempt (different key) starts from scratch, not from the old checkpoints
    assert logged_calls(log)[-2] == {"stage": "train", "event": "start@0"}
    # upstream content change propagates: new source value → everything reruns
    fourth = run_pipeline(dag, run_root=runs, track=False, overrides=["train.epochs=5", "source.value=3"])
    assert [s.status for s in fourth.stages] == ["ran", "ran", "ran"]
    assert fourth.metrics["report"]["score"] == 3.0


def test_modified_output_is_detected(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    dag = fake_dag(tmp_path, log)
    runs = tmp_path / "runs"
    run_pipeline(dag, run_root=runs, track=False)
    (runs / "fake" / "report" / "report.json").write_text("tampered")
    again = run_pipeline(dag, run_root=runs, track=False)
    assert [s.status for s in again.stages] == ["skipped", "skipped", "ran"]


def test_interrupted_stage_resumes_from_checkpoint_and_is_never_marked_complete(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    flag = tmp_path / "crashed.flag"
    dag = fake_dag(tmp_path, log, crash_after=1, crash_flag=str(flag))
    runs = tmp_path / "runs"
    first = run_pipeline(dag, run_root=runs, track=False)
    assert not first.ok
    assert [s.status for s in first.stages] == ["ran", "failed", "not run"]
    assert "simulated crash" in (first.stages[1].error or "")
    assert "upstream train failed" in (first.stages[2].error or "")
    train_dir = runs / "fake" / "train"
    assert not (train_dir / COMPLETE_MARKER).exists()  # the half-written model is not marked complete
    assert (train_dir / ATTEMPT_MARKER).exists()
    assert not (runs / "fake" / "report" / COMPLETE_MARKER).exists()

    second = run_pipeline(dag, run_root=runs, track=False)
    assert second.ok
    assert [s.status for s in second.stages] == ["skipped", "ran", "ran"]
    assert second.stages[1].resumed
    starts = [c["event"] for c in logged_calls(log) if c["stage"] == "train"]
    assert starts == ["start@0", "start@2"]  # resumed after the checkpoint of epoch 1
    assert (train_dir / COMPLETE_MARKER).exists()


def test_stage_that_does_not_write_its_output_fails(tmp_path: Path) -> None:
    path = tmp_path / "forget.yaml"
    path.write_text(yaml.safe_dump({"name": "forget", "cluster": {"processes": False},
                                    "stages": {"a": {"kind": "fake_forgetful"}}}))
    summary = run_pipeline(path, run_root=tmp_path / "runs", track=False)
    assert summary.stages[0].status == "failed"
    assert "did not write output(s) thing" in (summary.stages[0].error or "")
    assert not (tmp_path / "runs" / "forget" / "a" / COMPLETE_MARKER).exists()


def test_force_reruns_a_complete_stage(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    dag = fake_dag(tmp_path, log)
    runs = tmp_path / "runs"
    run_pipeline(dag, run_root=runs, track=False)
    again = run_pipeline(dag, run_root=runs, track=False, force=["report"])
    assert [s.status for s in again.stages] == ["skipped", "skipped", "ran"]
    with pytest.raises(CalodistillError, match="--force nosuch: unknown stage"):
        run_pipeline(dag, run_root=runs, track=False, force=["nosuch"])
