"""Stage ``export`` (pipeline/stages/export.py, cli/export.py), ``generate --engine onnx``, the ``export``
stage kind and the ONNX model in the MLflow registry.

One tiny CaloGAN student (and teacher) is exported once per module (each export takes seconds); the
refusals fail before any export.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from calodistill.flows.export import OnnxSampler  # noqa: E402
from calodistill.flows.onnx_precision import convert_precision  # noqa: E402
from calodistill.pipeline.cli import main  # noqa: E402
from calodistill.pipeline.data.bundle import ModelBundle  # noqa: E402
from calodistill.pipeline.errors import CalodistillError  # noqa: E402
from calodistill.pipeline.stages.export import PARITY_RTOL, compare_showers, export_onnx  # noqa: E402
from calodistill.pipeline.stages.generate import generate_showers_file  # noqa: E402
from tests.pipeline.cli.test_bad_input import unwritable_dir  # noqa: E402,F401 - a fixture
from tests.pipeline.stages.test_generate import make_model_dir  # noqa: E402

THRESHOLD = 1e-3  # MeV: the preprocessing's voxel threshold (make_model_dir's default)
RANGE = [1000.0, 100000.0]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_models")
    student = make_model_dir(root / "student")
    (student / "provenance.json").write_text(json.dumps({"stage": "distill", "particle": "e+",
                                                         "incident_energy_range": RANGE}))
    return {"student": student, "teacher": make_model_dir(root / "teacher", kind="teacher", seed=1)}


@pytest.fixture(scope="module")
def exported(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out_dir = tmp_path_factory.mktemp("exported")
    result = export_onnx(models["student"], out_dir / "student.onnx", teacher_log_prob=out_dir / "teacher_lp.onnx",
                         teacher=str(models["teacher"]), parity_n=16)
    return {"result": result, "dir": out_dir, "sampler": out_dir / "student.onnx", "lp": out_dir / "teacher_lp.onnx"}


# -- export ------------------------------------------------------------------------------------------

def test_export_writes_a_checked_sampler_with_the_models_metadata(exported: dict[str, Any],
                                                                  models: dict[str, Path]) -> None:
    import onnx

    res = exported["result"]
    assert sorted(p.name for p in exported["dir"].iterdir()) == ["student.onnx", "teacher_lp.onnx"]  # no leftovers
    assert res["out"] == str(exported["sampler"]) and res["size_bytes"] == exported["sampler"].stat().st_size
    assert res["precision"] == "fp32" and res["opset"] == 18 and res["n_nodes"] > 0
    assert res["parity_showers"] == 16 and res["parity_compared"] > 0
    # the tiny model meets the strictest reading: every voxel within 1e-4, identical zeros
    assert res["parity_max_rel_diff"] <= PARITY_RTOL and res["parity_zero_mismatches"] == 0
    assert res["parity_max_shower_rel_diff"] <= PARITY_RTOL
    mask = os.umask(0o022)
    os.umask(mask)
    assert exported["sampler"].stat().st_mode & 0o777 == 0o666 & ~mask
    props = {p.key: p.value for p in onnx.load(str(exported["sampler"])).metadata_props}
    assert props["geometry"] == "calogan" and props["particle"] == "e+"
    assert json.loads(props["incident_energy_range_mev"]) == RANGE
    assert props["voxel_order"].startswith("layer by layer (288, 144, 72 voxels)")
    assert props["n_layers"] == "3" and props["n_voxels"] == "504" and props["precision"] == "fp32"
    assert props["model_digest"] == ModelBundle.open(models["student"]).weights_digest
    for key in ("calodistill_version", "torch_version", "onnx_version", "inputs", "outputs", "opset"):
        assert props[key]
    assert "geometry_json" not in props  # a preset travels by name


def test_teacher_log_prob_is_exported_and_checked(exported: dict[str, Any], models: dict[str, Path]) -> None:
    from calodistill.flows.export import onnx_session

    res = exported["result"]
    assert res["teacher_log_prob"] == str(exported["lp"]) and res["teacher_log_prob_max_abs_diff"] < 1e-2
    teacher = ModelBundle.open(models["teacher"]).generator("cpu")
    e = np.array([2e3, 3e4, 9e4])
    showers = teacher.sample(e, seed=4) + 1e-2
    want = teacher.log_prob(e, showers, add_noise=False)["total"]
    session: Any = onnx_session(exported["lp"], ["CPUExecutionProvider"])
    got = session.run(["log_prob"], {"showers": showers.astype(np.float32),
                                     "incident_energy": e.astype(np.float32)[:, None]})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-2)


def test_reduced_precisions_report_their_cost(exported: dict[str, Any], models: dict[str, Path],
                                              tmp_path: Path) -> None:
    from calodistill.flows.export import draw_noise, sample_from_noise

    gen = ModelBundle.open(models["student"]).generator("cpu")
    e = np.exp(np.random.default_rng(0).uniform(np.log(RANGE[0]), np.log(RANGE[1]), 24))
    noise = draw_noise(gen, 24, seed=2)
    want = sample_from_noise(gen, e, noise)
    reports = {}
    for precision in ("fp16", "int8", "int8-dynamic"):
        path = convert_precision(exported["sampler"], tmp_path / f"{precision}.onnx", precision)
        sampler = OnnxSampler(path, threads=1)
        assert sampler.metadata["precision"] == precision and sampler.metadata["geometry"] == "calogan"
        reports[precision] = compare_showers(sampler.sample(e, noise), want, THRESHOLD)
        assert reports[precision]["finite"]
    assert reports["fp16"]["median_rel_diff"] < 1e-3
    assert reports["int8"]["median_rel_diff"] < 0.05 and reports["int8-dynamic"]["median_rel_diff"] < 0.1
    assert (tmp_path / "int8.onnx").stat().st_size < exported["sampler"].stat().st_size
    with pytest.raises(Exception, match="precision: unknown 'fp8'"):
        convert_precision(exported["sampler"], tmp_path / "x.onnx", "fp8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16.onnx", "int8-dynamic.onnx", "int8.onnx"]


# -- generate --engine onnx -----------------------------------------------------------------------------

def test_generate_engine_onnx_equals_the_torch_path(exported: dict[str, Any], models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    from calodistill.pipeline.data.formats import read_showers

    common = {"n": 40, "energies": "uniform:2GeV:90GeV", "batch_size": 16, "seed": 3, "device": "cpu"}
    torch_res = generate_showers_file(str(models["student"]), out=tmp_path / "torch.h5", **common)
    onnx_res = generate_showers_file(str(models["student"]), out=tmp_path / "onnx.h5", engine="onnx",
                                     onnx=exported["sampler"], **common)
    assert torch_res["engine"] == "torch" and onnx_res["engine"] == "onnx"
    a, b = read_showers(tmp_path / "torch.h5"), read_showers(tmp_path / "onnx.h5")
    np.testing.assert_array_equal(a.incident_energy, b.incident_energy)
    report = compare_showers(b.voxels, a.voxels, THRESHOLD)
    assert report["compared"] > 0 and report["max_rel_diff"] <= PARITY_RTOL
    assert report["zero_mismatches"] == 0 and report["max_shower_rel_diff"] <= PARITY_RTOL


def test_generate_engine_onnx_refusals(exported: dict[str, Any], models: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "g.h5"
    cases = [
        ({"engine": "jax"}, "--engine: unknown 'jax'"),
        ({"onnx": exported["sampler"]}, "--onnx: only with --engine onnx"),
        ({"engine": "onnx", "scheduler": "tcp://127.0.0.1:1"}, "leave out --scheduler"),
        ({"engine": "onnx", "onnx": tmp_path / "nope.onnx"}, "no such ONNX file"),
    ]
    other = onnx.load(str(exported["sampler"]))
    for prop in other.metadata_props:
        if prop.key == "model_digest":
            prop.value = "0123456789abcdef"
    onnx.save(other, str(tmp_path / "other.onnx"))
    cases.append(({"engine": "onnx", "onnx": tmp_path / "other.onnx"}, "exported from another model"))
    for kwargs, message in cases:
        with pytest.raises(CalodistillError, match=message):
            generate_showers_file(str(models["student"]), 3, "10GeV", out, device="cpu", **kwargs)
    with pytest.raises(CalodistillError, match="holds a teacher"):
        generate_showers_file(str(models["teacher"]), 3, "10GeV", out, device="cpu", engine="onnx",
                              onnx=exported["sampler"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.onnx"]


@pytest.mark.slow
def test_generate_engine_onnx_exports_on_the_fly(models: dict[str, Path], tmp_path: Path) -> None:
    res = generate_showers_file(str(models["student"]), 5, "10GeV", tmp_path / "g.parquet", device="cpu",
                                engine="onnx")
    assert res["engine"] == "onnx" and res["n"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["g.parquet"]


# -- refusals: one line, nothing written ---------------------------------------------------------------

def _one_line_error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("calodistill: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(("args", "message"), [
    (["--model", "{teacher}", "--out", "{tmp}/s.onnx"], "holds a teacher (MAF), which samples in D sequential"),
    (["--model", "{student}", "--out", "{tmp}/s.onnx", "--precision", "fp8"], "--precision: unknown 'fp8'"),
    (["--model", "{student}", "--out", "{tmp}/s.pt"], "unknown format '.pt'"),
    (["--model", "{student}", "--out", "{tmp}/existing.onnx"], "file already exists; pass --overwrite"),
    (["--model", "{student}", "--out", "{tmp}/a_file/s.onnx"], "is a file, not a directory"),
    (["--model", "{student}", "--out", "{tmp}/s.onnx", "--opset", "17"], "--opset: must be an integer >= 18"),
    (["--model", "{student}"], "--out: give the file to write"),
    (["--model", "{student}", "--out", "{tmp}/s.onnx", "--teacher-log-prob", "{tmp}/s.onnx"], "the same file as --out"),
    (["--model", "{student}", "--out", "{tmp}/s.onnx", "--teacher-log-prob", "{tmp}/t.onnx"],
     "holds no teacher.pt and records no teacher directory"),
    (["--model", "{corrupt}", "--out", "{tmp}/s.onnx"], "student.pt"),
    (["--model", "{tmp}/missing", "--out", "{tmp}/s.onnx"], "missing"),
])
def test_bad_input_is_one_line_and_writes_nothing(models: dict[str, Path], tmp_path: Path, args: list[str],
                                                  message: str, capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt"
    shutil.copytree(models["student"], corrupt)
    (corrupt / "student.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "existing.onnx").write_bytes(b"keep me")
    (tmp_path / "a_file").write_text("x")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    fill = {"student": str(models["student"]), "teacher": str(models["teacher"]), "corrupt": str(corrupt),
            "tmp": str(tmp_path)}
    err = _one_line_error(capsys, main(["export", *(a.format(**fill) for a in args)]))
    assert message in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "existing.onnx").read_bytes() == b"keep me"


def test_unwritable_output_is_one_line(models: dict[str, Path], unwritable_dir: Path,  # noqa: F811
                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["export", "--model", str(models["student"]), "--out", str(unwritable_dir / "s.onnx")])
    assert "is not writable" in _one_line_error(capsys, rc)
    assert list(unwritable_dir.iterdir()) == []


def test_failed_parity_check_refuses_and_removes_everything(models: dict[str, Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import calodistill.flows.export as flows_export
    import calodistill.pipeline.stages.export as stage

    def fake_export(generator: Any, path: Path, **kwargs: Any) -> Path:
        Path(path).write_bytes(b"a graph")
        return Path(path)

    bad = {"max_rel_diff": 3e-2, "median_rel_diff": 1e-6, "p99_rel_diff": 1e-5, "max_shower_rel_diff": 3e-2,
           "zero_mismatches": 0, "zero_mismatch_fraction": 0.0, "compared": 10, "finite": True}
    monkeypatch.setattr(flows_export, "export_sampler", fake_export)
    monkeypatch.setattr(stage, "_sampler_parity", lambda *a, **k: (bad, None))
    message = r"parity check failed on 4 showers: .*a shower differs by 0.03 of its energy.*nothing written"
    with pytest.raises(CalodistillError, match=message):
        export_onnx(models["student"], tmp_path / "new" / "deeper" / "s.onnx", parity_n=4)
    assert list(tmp_path.iterdir()) == []


# -- the export stage kind and the registry ----------------------------------------------------------------

def test_export_stage_logs_and_registers_the_onnx_model(models: dict[str, Path], tmp_path: Path) -> None:
    """A DAG distil (fake) → export (int8): the ONNX model is logged with the onnx flavour and registered as
    ``<student>-onnx@champion``, next to the student, linked to the student's version."""
    import mlflow.artifacts
    import mlflow.onnx
    import onnxruntime as ort
    from mlflow.tracking import MlflowClient

    from calodistill.pipeline.orchestration.runner import run_pipeline
    from tests.pipeline.orchestration import test_tracking  # noqa: F401 - registers the fake_student kind

    registered = "calodistill-test-export-student"
    data = {
        "name": "exported",
        "tracking": {"experiment": "calodistill-test-export", "registered_model": registered, "alias": "champion",
                     "system_metrics_interval": 1.0},
        "cluster": {"processes": False},
        "stages": {
            "distill": {"kind": "fake_student", "inputs": {"teacher": str(models["teacher"])}},
            "export": {"kind": "export", "inputs": {"model": "distill.model"}, "outputs": ["onnx"],
                       "params": {"precision": "int8", "parity_n": 8}},
        },
    }
    dag = tmp_path / "exported.yaml"
    dag.write_text(yaml.safe_dump(data))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_pipeline(dag, run_root=tmp_path / "runs", tracking_uri=uri)
    assert summary.ok, summary.format_table()
    metrics = summary.metrics["export"]
    assert metrics["parity_max_rel_diff"] <= PARITY_RTOL and metrics["fidelity_median_rel_diff"] < 0.1
    assert (tmp_path / "runs" / "exported" / "export" / "student.onnx").is_file()

    client = MlflowClient(uri, registry_uri=uri)
    student = client.get_model_version_by_alias(registered, "champion")
    version = client.get_model_version_by_alias(f"{registered}-onnx", "champion")
    assert version.tags["calodistill.precision"] == "int8"
    assert version.tags["calodistill.student_model"] == f"models:/{registered}/{student.version}"
    assert version.tags["calodistill.geometry"] == "calogan"
    source = client.get_model_version_download_uri(f"{registered}-onnx", version.version)
    local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    model = mlflow.onnx.load_model(local)
    assert {p.key: p.value for p in model.metadata_props}["precision"] == "int8"
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    out = session.run(None, {"incident_energy": np.full((2, 1), 1e4, np.float32),
                             "noise": rng.standard_normal((2, 3 + 504)).astype(np.float32)})[0]
    assert out.shape == (2, 504) and np.isfinite(out).all()
