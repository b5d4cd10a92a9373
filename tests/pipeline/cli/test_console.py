"""The terminal of ``calodistill run`` (pipeline/cli/console.py, pipeline/logs.py, pipeline/worker_logs.py):
the summary on stdout, nothing from MLflow, Dask or Python warnings on stderr, the detail in the run log.

The CLI runs in a subprocess on a LocalCluster of worker processes (as a user runs it); the cheap fake
stage kinds of the orchestration tests are registered by this module, which the workers import too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from calodistill.pipeline.cli.console import configure_console
from calodistill.pipeline.logs import RUN_LOG_NAME, ExpectedErrorFilter
from calodistill.pipeline.orchestration.registry import (
    StageContext,
    StageKind,
    StageResult,
    register_stage_kind,
)
from tests.pipeline.orchestration import (
    test_tracking as fakes,  # registers fake_source, fake_train, fake_student
)

REPO = Path(__file__).resolve().parents[3]


def fake_noisy(ctx: StageContext) -> StageResult:
    """Warns and logs like a chatty library would, on the worker."""
    warnings.warn("a chatty library warning", UserWarning, stacklevel=1)
    logging.getLogger("some.library").info("library detail")
    ctx.outputs["note"].write_text("ok")
    return StageResult(metrics={"n": 1.0})


register_stage_kind(StageKind("fake_noisy", fake_noisy, inputs={}, outputs={"note": "note.txt"}, key_metric="n"),
                    replace=True)

_CLI = """
import sys
import tests.pipeline.cli.test_console  # the fake stage kinds
from calodistill.pipeline.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_run_terminal_shows_the_summary_and_the_run_log_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    data = {
        "name": "console",
        "tracking": {"experiment": "calodistill-console", "registered_model": "calodistill-console-student"},
        "cluster": {"n_workers": 1, "threads_per_worker": 1},  # worker processes, as by default
        "stages": {
            "source": {"kind": "fake_source", "params": {"log": str(log)}},
            "train": {"kind": "fake_train", "inputs": {"data": "source.data"}, "params": {"log": str(log), "epochs": 2}},
            "distill": {"kind": "fake_student", "inputs": {"teacher": "train.model"}},  # logs a pyfunc model
            "noisy": {"kind": "fake_noisy"},
        },
    }
    dag = tmp_path / "console.yaml"
    dag.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", _CLI, "run", str(dag), "--runs-dir", str(tmp_path / "runs"),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "speedup_vs_teacher = 100" in proc.stdout and "MLflow parent run" in proc.stdout
    for noise in ("Warning", "INFO", "Traceback", "Downloading", "Successfully registered"):
        assert noise not in proc.stderr, proc.stderr
    run_log = (tmp_path / "runs" / "console" / RUN_LOG_NAME).read_text()
    for detail in ("distributed.scheduler", "stage distill: ran", "registered student as models:/",
                   "a chatty library warning", "some.library: library detail", "Successfully registered model"):
        assert detail in run_log, detail


def test_console_filter_and_format(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without -v: our records from the command's level, others' from ERROR, first lines only; -v: all of it."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", root.level)
    for name in ("MLFLOW_CONFIGURE_LOGGING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)

    def shown(name: str, level: int, msg: str = "m") -> str | None:
        record = logging.LogRecord(name, level, __file__, 1, msg, None, None)
        handler = root.handlers[0]
        return handler.format(record) if level >= handler.level and handler.filter(record) else None

    try:
        configure_console(verbose=False, command="run")
        assert os.environ["MLFLOW_CONFIGURE_LOGGING"] == "false"
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
        assert shown("calodistill.pipeline.orchestration.runner", logging.INFO) is None
        assert shown("calodistill.pipeline.orchestration.runner", logging.WARNING, "one\nTraceback ...").endswith(": one")
        assert shown("distributed.scheduler", logging.WARNING) is None
        assert shown("py.warnings", logging.WARNING) is None
        assert shown("mlflow.store", logging.ERROR) is not None
        configure_console(verbose=False, command="generate")
        assert len(root.handlers) == 1
        assert shown("calodistill.pipeline.stages.generate", logging.INFO) is not None
        configure_console(verbose=True, command="run")
        assert shown("distributed.scheduler", logging.DEBUG, "one\ntwo").endswith("one\ntwo")
    finally:
        logging.captureWarnings(False)


def test_expected_error_filter_drops_only_calodistill_errors() -> None:
    def record(exception: str) -> logging.LogRecord:
        msg = "Compute Failed\nKey:       %s\nState:     %s\nTask:  %s\nException: %r\nTraceback: %r\n"
        return logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1, msg,
                                 ("k", "executing", "<Task>", exception, "  File ..."), None)

    keep = ExpectedErrorFilter()
    assert not keep.filter(record("CalodistillError('/data/x.csv: non-positive incident energy -10 GeV in row 2')"))
    assert keep.filter(record("ZeroDivisionError('division by zero')"))
    assert keep.filter(logging.LogRecord("distributed.worker", logging.INFO, __file__, 1, "Start worker", None, None))


_ = fakes
