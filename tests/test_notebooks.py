"""The notebooks run top to bottom against a finished pipeline run, and fail the test if any cell fails.

The run: ``CALODISTILL_QUICKSTART_DIR`` (a directory holding the ``mlflow.db`` of a finished
``calodistill run dags/quickstart.yaml``), or else a reduced quickstart (2 000 synthetic showers, one
epoch per model) run once per session into a temporary directory. Both are slow: marked ``slow``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))

# The quickstart DAG shrunk to a couple of minutes on a laptop CPU.
REDUCED_QUICKSTART = [
    'ingest.inputs.sources=["synth:calogan?n=2000&seed=1&spectrum=uniform"]',
    "train_teacher.flow1.train.epochs=1",
    "train_teacher.teacher.train.epochs=1",
    "train_teacher.check_samples=20",
    "distill.train.epochs=1",
    "distill.distill.kl_samples=100",
    "distill.nll_subset=10",
    "distill.check_samples=100",
    "distill.teacher_check_samples=10",
    "distill.timing_batch=100",
    "distill.teacher_timing_batch=10",
    "distill.timing_repeats=1",
    "generate_student.n=300",
    "generate_teacher.n=40",  # the MAF teacher samples with D sequential passes: slow on a CPU
    "evaluate.max_showers=300",
    "evaluate.likelihood_max_showers=300",
    "evaluate.student_nll_max_showers=5",
    "evaluate.kl_samples=100",
    "evaluate.timing_batch_sizes=[1, 10]",
    "evaluate.classifier={max_epochs: 3, patience: 2}",
]


@pytest.fixture(scope="session")
def pipeline_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory whose ``mlflow.db`` holds a finished quickstart-like pipeline run."""
    given = os.environ.get("CALODISTILL_QUICKSTART_DIR")
    if given:
        if not (Path(given) / "mlflow.db").is_file():
            pytest.fail(f"CALODISTILL_QUICKSTART_DIR={given}: no mlflow.db there")
        return Path(given)
    from calodistill.pipeline.orchestration.runner import run_pipeline

    work = tmp_path_factory.mktemp("quickstart")
    cwd = Path.cwd()
    os.chdir(work)  # MLflow artifacts (mlruns/) go next to the store
    try:
        summary = run_pipeline(REPO / "dags" / "quickstart.yaml", overrides=REDUCED_QUICKSTART,
                               run_root=work / "runs", tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    finally:
        os.chdir(cwd)
    assert summary.ok, summary
    return work


@pytest.fixture()
def notebook_env(pipeline_run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{pipeline_run_dir / 'mlflow.db'}")
    monkeypatch.setenv("CALODISTILL_NB_SHOWERS", "300")
    monkeypatch.setenv("CALODISTILL_NB_STUDENT_EXACT", "5")
    monkeypatch.setenv("CALODISTILL_NB_KL", "100")
    monkeypatch.setenv("CALODISTILL_NB_TIMING_SECONDS", "5")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("CALODISTILL_RUN_ID", raising=False)
    yield pipeline_run_dir


def test_notebooks_are_committed_without_outputs() -> None:
    import nbformat

    assert {p.name for p in NOTEBOOKS} >= {"teacher_student_likelihoods.ipynb", "shower_quality.ipynb"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: commit without outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path, notebook_env: Path, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # kernel "python3" with argv[0] "python" is started with this interpreter (the venv's) by jupyter_client
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Traceback" not in text
