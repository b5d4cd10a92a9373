"""ModelBundle: one open per model directory, its properties, lazily loaded flows and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from calodistill.flows.models import IAF, MAF
from calodistill.pipeline.data import bundle as bundle_mod
from calodistill.pipeline.data.bundle import ModelBundle
from calodistill.pipeline.errors import CalodistillError
from tests.pipeline.stages.test_generate import make_model_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundle")
    return {"student": make_model_dir(root / "student"), "teacher": make_model_dir(root / "teacher", kind="teacher")}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line(exc: pytest.ExceptionInfo[CalodistillError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_properties_of_a_student_directory(models: dict[str, Path]) -> None:
    b = ModelBundle.open(models["student"])
    assert b.path == models["student"] and b.kind == "student" and b.kinds == ("student",)
    assert b.layer_sizes == [288, 144, 72] and b.n_voxels == 504
    assert b.geometry.name == "calogan" and b.particle == "e+"
    assert b.energy_range is None and b.provenance == {} and b.history is None
    assert set(b.records) == {"preprocessing.json"}
    assert isinstance(b.flow1, MAF) and isinstance(b.flow2, IAF)
    assert b.flow1 is b.flow1 and b.flow2 is b.flow2_of("student")  # loaded once
    gen = b.generator("cpu")
    assert gen is b.generator() and gen.kind == "student" and gen.flow2 is b.flow2
    assert gen.sample(np.array([1e4, 5e4]), seed=1).shape == (2, 504)
    assert len(b.digest) == 16 and b.digest == ModelBundle.open(models["student"]).digest
    assert "student" in repr(b)


def test_same_showers_as_load_generator(models: dict[str, Path]) -> None:
    from calodistill.flows.serialization import load_generator

    e = np.array([2e3, 3e4, 9e4])
    ref = load_generator(models["teacher"], device="cpu").sample(e, seed=4)
    assert np.array_equal(ModelBundle.open(models["teacher"]).generator("cpu").sample(e, seed=4), ref)


def test_kinds_and_wrong_kind(models: dict[str, Path], tmp_path: Path) -> None:
    teacher = ModelBundle.open(models["teacher"])
    assert teacher.kind == "teacher" and isinstance(teacher.flow2, MAF)
    with pytest.raises(CalodistillError) as exc:
        ModelBundle.open(models["teacher"], kind="student")
    assert "no student.pt" in _one_line(exc) and str(models["teacher"]) in str(exc.value)
    both = _copy(models["student"], tmp_path / "both")
    shutil.copy(models["teacher"] / "teacher.pt", both / "teacher.pt")
    b = ModelBundle.open(both)
    assert b.kind == "student" and b.kinds == ("student", "teacher")
    assert ModelBundle.open(both, kind="teacher").kind == "teacher"
    assert isinstance(b.flow2_of("teacher"), MAF)
    # a MAF saved as student.pt is the wrong kind
    shutil.copy(models["teacher"] / "teacher.pt", both / "student.pt")
    with pytest.raises(CalodistillError) as exc:
        ModelBundle.open(both).flow2  # noqa: B018
    assert "student.pt: holds MAF, a student must be an IAF" in _one_line(exc)
    with pytest.raises(CalodistillError, match="kind: must be"):
        ModelBundle.open(both, kind="pupil")


def test_provenance_geometry_and_particle_records(models: dict[str, Path], tmp_path: Path) -> None:
    d = _copy(models["student"], tmp_path / "m")
    (d / "train_config.json").write_text(json.dumps({"seed": 3, "geometry": {"name": "calogan"}}))
    (d / "metrics.json").write_text(json.dumps({"test_nll": 1.5, "incident_energy_range": [1e3, 1e5],
                                                "dataset_digest": "abc"}))
    (d / "history.json").write_text(json.dumps({"student": [{"loss": 1.0}]}))
    (d / "notes.json").write_text("{not json")  # an unreadable record is skipped
    (d / "run.json").write_text(json.dumps({"particle": "gamma"}))
    b = ModelBundle.open(d)
    assert b.provenance == {"train_config": {"seed": 3, "geometry": {"name": "calogan"}},
                            "metrics": {"test_nll": 1.5, "incident_energy_range": [1e3, 1e5],
                                        "dataset_digest": "abc"},
                            "dataset_digest": "abc"}
    assert b.energy_range == (1e3, 1e5) and b.history == {"student": [{"loss": 1.0}]}
    assert b.geometry.name == "calogan" and b.particle == "gamma"
    assert b.digest != ModelBundle.open(models["student"]).digest


def test_one_line_errors(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CalodistillError) as exc:
        ModelBundle.open(tmp_path / "nowhere")
    assert "nowhere: no such model directory" in _one_line(exc)
    missing = _copy(models["student"], tmp_path / "missing")
    (missing / "flow1.pt").unlink()
    with pytest.raises(CalodistillError) as exc:
        ModelBundle.open(missing)
    assert "not a model directory (needs preprocessing.json, flow1.pt" in _one_line(exc)
    corrupt = _copy(models["student"], tmp_path / "corrupt")
    (corrupt / "student.pt").write_bytes(b"not a torch file\n\x00garbage")
    b = ModelBundle.open(corrupt)  # the weights are read on first use
    with pytest.raises(CalodistillError) as exc:
        b.generator("cpu")
    assert f"{corrupt / 'student.pt'}: cannot read flow file" in _one_line(exc)
    bad_json = _copy(models["student"], tmp_path / "badjson")
    (bad_json / "preprocessing.json").write_text("{")
    with pytest.raises(CalodistillError) as exc:
        ModelBundle.open(bad_json)
    assert f"{bad_json / 'preprocessing.json'}: not valid JSON" in _one_line(exc)
    bad_state = _copy(models["student"], tmp_path / "badstate")
    (bad_state / "preprocessing.json").write_text(json.dumps({"kind": "Other"}))
    with pytest.raises(CalodistillError) as exc:
        ModelBundle.open(bad_state)
    assert f"{bad_state / 'preprocessing.json'}: kind is 'Other'" in _one_line(exc)


def test_flow2_only_directory(models: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "flows"
    d.mkdir()
    shutil.copy(models["student"] / "student.pt", d / "student.pt")
    with pytest.raises(CalodistillError, match="not a model directory"):
        ModelBundle.open(d)
    b = ModelBundle.open(d, flow2_only=True)
    assert b.kinds == ("student",) and isinstance(b.flow2, IAF)
    with pytest.raises(CalodistillError) as exc:
        b.generator()
    assert "missing preprocessing.json" in _one_line(exc)
    with pytest.raises(CalodistillError, match=r"--model-dir .*empty: no teacher.pt or student.pt found"):
        (tmp_path / "empty").mkdir()
        ModelBundle.open(tmp_path / "empty", flow2_only=True, label="--model-dir")


def test_logged_pyfunc_layout(models: dict[str, Path], tmp_path: Path) -> None:
    logged = tmp_path / "logged"
    shutil.copytree(models["student"], logged / "artifacts" / "model_dir")
    assert ModelBundle.open(logged).path == logged / "artifacts" / "model_dir"
    other = tmp_path / "other"  # a pyfunc logged by hand, with another artifact name
    shutil.copytree(models["student"], other / "artifacts" / "student_model")
    assert ModelBundle.open(f"file:{other}").path == other / "artifacts" / "student_model"


def test_generate_opens_the_model_once(models: dict[str, Path], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from calodistill.pipeline.stages.generate import generate_showers_file

    opened: list[str] = []
    loaded: list[str] = []
    original_open = ModelBundle.open.__func__  # type: ignore[attr-defined]
    original_load = bundle_mod.load_flow

    def counting_open(cls: type[ModelBundle], model: object, *args: object, **kwargs: object) -> ModelBundle:
        opened.append(str(model))
        return original_open(cls, model, *args, **kwargs)

    def counting_load(path: Path, *args: object, **kwargs: object) -> object:
        loaded.append(Path(path).name)
        return original_load(path, *args, **kwargs)

    monkeypatch.setattr(ModelBundle, "open", classmethod(counting_open))
    monkeypatch.setattr(bundle_mod, "load_flow", counting_load)
    generate_showers_file(str(models["student"]), 5, "50GeV", tmp_path / "one.h5", device="cpu")
    assert opened == [str(models["student"])] and sorted(loaded) == ["flow1.pt", "student.pt"]
    opened.clear()
    loaded.clear()
    generate_showers_file(str(models["student"]), 25, "ladder", tmp_path / "sharded.h5", shard_size=10,
                          device="cpu", progress=False)  # three shards in this process share the open model
    assert opened == [str(models["student"])] and sorted(loaded) == ["flow1.pt", "student.pt"]


def test_generate_reports_corrupt_weights_and_writes_nothing(models: dict[str, Path], tmp_path: Path) -> None:
    from calodistill.pipeline.stages.generate import generate_showers_file

    corrupt = _copy(models["student"], tmp_path / "corrupt")
    (corrupt / "flow1.pt").write_bytes(b"garbage")
    out = tmp_path / "out" / "showers.h5"
    with pytest.raises(CalodistillError, match=r"flow1\.pt: cannot read flow file"):
        generate_showers_file(str(corrupt), 5, "50GeV", out, device="cpu")
    assert not out.parent.exists()


def test_geometry_travels_with_the_model_and_other_geometries_are_refused(models: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    from calodistill.pipeline.data.geometry import get_geometry

    spec = tmp_path / "same-sizes.yaml"  # 288 + 144 + 72 cells like CaloGAN, but other cells
    spec.write_text("name: same-sizes\nlayers:\n  - {nx: 96, ny: 3, cell_mm: 2}\n  - {nx: 12, ny: 12, cell_mm: 10}\n"
                    "  - {nx: 6, ny: 12, cell_mm: 10}\n")
    mine = get_geometry(spec)
    calogan = get_geometry("calogan")
    d = _copy(models["student"], tmp_path / "custom")
    (d / "provenance.json").write_text(json.dumps({"stage": "distill", "geometry": mine.to_dict()}))
    b = ModelBundle.open(d)
    assert b.geometry == mine and b.geometry.name == "same-sizes"  # the record, not the preset of that size
    b.check_geometry(mine, "dataset x")
    with pytest.raises(CalodistillError) as exc:
        b.check_geometry(calogan, "dataset data/calogan")
    assert "dataset data/calogan is on geometry calogan" in _one_line(exc) and "trained on same-sizes" in _one_line(exc)
    # a model without a record: checked by its voxels per layer
    plain = ModelBundle.open(models["student"])
    plain.check_geometry(calogan, "dataset y")
    nai = get_geometry(Path(__file__).resolve().parents[3] / "examples" / "nai-gears" / "geometry.yaml")
    with pytest.raises(CalodistillError, match=r"dataset z is on geometry nai-gears .*layers of \[288, 144, 72\] voxels"):
        plain.check_geometry(nai, "dataset z")
