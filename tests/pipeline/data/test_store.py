"""The MLflow read side: a lookup in a store that does not exist fails in one line and creates nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from calodistill.pipeline.data.store import find_pipeline_run, resolve_model_dir
from calodistill.pipeline.errors import CalodistillError


@pytest.mark.parametrize(
    ("uri", "path"),
    [("sqlite:////abs/mlflow.db", "/abs/mlflow.db"), ("sqlite:///rel.db?mode=ro", "rel.db"),
     ("file:///abs/mlruns", "/abs/mlruns"), ("./mlruns", "mlruns"), ("http://host:5000", None),
     ("postgresql://u@h/db", None), ("databricks", None), ("sqlite://", None)],
)
def test_local_store_path(uri: str, path: str | None) -> None:
    from calodistill.pipeline.data.store import local_store_path

    assert local_store_path(uri) == (Path(path) if path else None)


def test_models_uri_without_a_store_creates_no_mlflow_db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from calodistill.pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(CalodistillError, match=r"--model models:/m@champion: no MLflow tracking store at .*mlflow.db"):
        resolve_model_dir("models:/m@champion")
    with pytest.raises(CalodistillError, match="no MLflow tracking store"):
        resolve_model_dir("models:/m/1", tracking_uri=f"sqlite:///{tmp_path / 'elsewhere.db'}")
    with pytest.raises(CalodistillError, match="no MLflow tracking store"):
        find_pipeline_run()
    rc = main(["generate", "--model", "models:/calodistill-quickstart-student@champion", "-n", "5",
               "--out", str(tmp_path / "out.h5")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "no MLflow tracking store" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
