"""DAG files: parsing into typed specs, validation errors naming file/stage/key, order, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.orchestration.dag import (
    FileInput,
    LiteralInput,
    StageRef,
    apply_overrides,
    load_dag,
    parse_override,
)

REPO = Path(__file__).resolve().parents[3]


def _write(tmp_path: Path, data: dict, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _base() -> dict:
    return {
        "name": "demo",
        "stages": {
            "ingest": {"kind": "ingest", "inputs": {"sources": ["synth:calogan?n=100"]}, "outputs": ["dataset"],
                       "params": {"geometry": "calogan"}},
            "train_teacher": {"kind": "train_teacher", "inputs": {"data": "ingest.dataset"}, "outputs": ["model"],
                              "params": {"seed": 1, "teacher": {"train": {"epochs": 2}, "model": {"hidden_features": 32}}}},
            "distill": {"kind": "distill", "inputs": {"teacher": "train_teacher.model", "data": "ingest.dataset"},
                        "outputs": ["model"]},
        },
    }


def test_parses_typed_specs_in_topological_order(tmp_path: Path) -> None:
    data = _base()
    # declare distill first: the order must still follow the data flow
    data["stages"] = {"distill": data["stages"]["distill"], **{k: v for k, v in data["stages"].items() if k != "distill"}}
    dag = load_dag(_write(tmp_path, data))
    assert dag.name == "demo"
    assert dag.order == ["ingest", "train_teacher", "distill"]
    d = dag.stages["distill"]
    assert d.inputs["teacher"] == StageRef("train_teacher", "model")
    assert d.upstream == ["train_teacher", "ingest"]
    assert dag.stages["ingest"].inputs["sources"] == (LiteralInput("synth:calogan?n=100"),)
    assert dag.stages["train_teacher"].outputs == {"model": "model"}
    assert dag.stages["train_teacher"].params["teacher"]["model"] == {"hidden_features": 32}


def test_file_inputs_resolve_and_missing_files_are_named(tmp_path: Path) -> None:
    src = tmp_path / "showers.h5"
    src.write_bytes(b"x")
    data = _base()
    data["stages"]["ingest"]["inputs"]["sources"] = [str(src)]
    dag = load_dag(_write(tmp_path, data))
    assert dag.stages["ingest"].inputs["sources"] == (FileInput(src.resolve()),)
    data["stages"]["ingest"]["inputs"]["sources"] = [str(tmp_path / "nope.h5")]
    path = _write(tmp_path, data)
    with pytest.raises(CalodistillError, match=r"p\.yaml: stage 'ingest': inputs\.sources\[0\]: input file .*nope\.h5"):
        load_dag(path)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d["stages"]["train_teacher"].update(colour="red"),
         r"p\.yaml: stage 'train_teacher': unknown key 'colour'"),
        (lambda d: d.update(extra=1), r"p\.yaml: unknown key 'extra'"),
        (lambda d: d["stages"]["ingest"]["params"].update(bogus=1),
         r"p\.yaml: stage 'ingest': params: unknown key 'bogus'"),
        (lambda d: d["stages"]["distill"]["inputs"].pop("teacher"),
         r"p\.yaml: stage 'distill': inputs: missing input 'teacher'"),
        (lambda d: d["stages"]["distill"]["inputs"].update(teacher="train_teacher.weights"),
         r"p\.yaml: stage 'distill': inputs\.teacher: stage 'train_teacher' has no output 'weights'"),
        (lambda d: d["stages"]["distill"]["inputs"].update(extra="ingest.dataset"),
         r"p\.yaml: stage 'distill': inputs: unknown key 'extra'"),
        (lambda d: d["stages"]["distill"].update(kind="teleport"),
         r"p\.yaml: stage 'distill': kind: unknown stage kind 'teleport'"),
        (lambda d: d["stages"]["distill"].pop("kind"), r"p\.yaml: stage 'distill': missing key 'kind'"),
        (lambda d: d["stages"]["distill"].update(outputs=["model", "extra"]),
         r"p\.yaml: stage 'distill': outputs: unknown output 'extra'"),
        (lambda d: d["stages"]["distill"].update(gpu="yes"), r"p\.yaml: stage 'distill': gpu: expected true or false"),
        (lambda d: d.update(tracking={"experiment": "x", "colour": 1}), r"p\.yaml: tracking: unknown key 'colour'"),
        (lambda d: d.update(cluster={"n_workers": "two"}), r"p\.yaml: cluster: n_workers: expected an integer"),
        (lambda d: d.update(stages={}), r"p\.yaml: stages: no stages"),
    ],
)
def test_validation_errors_name_file_stage_and_key(tmp_path: Path, mutate, pattern: str) -> None:
    data = _base()
    mutate(data)
    with pytest.raises(CalodistillError, match=pattern):
        load_dag(_write(tmp_path, data))


def test_cycle_is_detected(tmp_path: Path) -> None:
    data = _base()
    data["stages"]["train_teacher"]["inputs"]["data"] = "distill.model"
    with pytest.raises(CalodistillError, match=r"p\.yaml: stage '(train_teacher|distill)': inputs: cycle "
                                               r".*train_teacher.*distill|cycle .*distill.*train_teacher"):
        load_dag(_write(tmp_path, data))


def test_self_reference_is_a_cycle(tmp_path: Path) -> None:
    data = _base()
    data["stages"]["distill"]["inputs"]["teacher"] = "distill.model"
    with pytest.raises(CalodistillError, match=r"stage 'distill'.*cycle distill -> distill"):
        load_dag(_write(tmp_path, data))


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed\n")
    with pytest.raises(CalodistillError, match=r"bad\.yaml: invalid YAML"):
        load_dag(bad)
    with pytest.raises(CalodistillError, match=r"absent\.yaml: cannot read DAG file"):
        load_dag(tmp_path / "absent.yaml")


def test_overrides_are_typed_and_reach_nested_params(tmp_path: Path) -> None:
    path = _write(tmp_path, _base())
    dag = load_dag(path, ["train_teacher.teacher.train.epochs=5", "train_teacher.teacher.model.hidden_features=64",
                          "train_teacher.teacher.train.lr=1e-3", "ingest.split_seed=3", "distill.gpu=false",
                          "train_teacher.flow1.model.kind=affine", "train_teacher.seed=7"])
    p = dag.stages["train_teacher"].params
    assert p["teacher"]["train"]["epochs"] == 5 and isinstance(p["teacher"]["train"]["epochs"], int)
    assert p["teacher"]["model"] == {"hidden_features": 64}
    assert p["teacher"]["train"]["lr"] == pytest.approx(1e-3) and isinstance(p["teacher"]["train"]["lr"], float)
    assert p["flow1"] == {"model": {"kind": "affine"}}
    assert p["seed"] == 7
    assert dag.stages["ingest"].params["split_seed"] == 3
    assert dag.stages["distill"].gpu is False


def test_stage_configs_are_checked_on_load(tmp_path: Path) -> None:
    data = _base()
    data["stages"]["train_teacher"]["params"]["teacher"]["train"]["epoch"] = 3
    with pytest.raises(CalodistillError, match=r"p\.yaml: stage 'train_teacher': .*unknown key .*epoch"):
        load_dag(_write(tmp_path, data))
    data = _base()
    data["stages"]["gen"] = {"kind": "generate", "inputs": {"model": "distill.model"},
                             "params": {"n": 10, "energies": "uniform:5GeV:1GeV"}}
    with pytest.raises(CalodistillError, match=r"stage 'gen': params\.energies: .*LOW must be below HIGH"):
        load_dag(_write(tmp_path, data))
    data["stages"]["gen"]["params"] = {"energies": "50GeV"}
    with pytest.raises(CalodistillError, match=r"stage 'gen': params: missing key 'n'"):
        load_dag(_write(tmp_path, data))


def test_override_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, _base())
    with pytest.raises(CalodistillError, match=r"p\.yaml: --set nosuch\.x=1: unknown stage 'nosuch'"):
        load_dag(path, ["nosuch.x=1"])
    with pytest.raises(CalodistillError, match=r"--set epochs: expected STAGE\.KEY=VALUE"):
        parse_override("epochs")
    with pytest.raises(CalodistillError, match=r"--set epochs=3: expected STAGE\.KEY=VALUE"):
        parse_override("epochs=3")
    with pytest.raises(CalodistillError, match=r"stage 'ingest': params: unknown key 'bogus'"):
        load_dag(path, ["ingest.bogus=1"])
    with pytest.raises(CalodistillError, match=r"stage 'train_teacher': params\.seed is not a mapping"):
        apply_overrides(_base(), ["train_teacher.seed.sub=1"], "p.yaml")


def test_gpu_stage_requests_resource(tmp_path: Path) -> None:
    data = _base()
    data["stages"]["train_teacher"]["gpu"] = True
    dag = load_dag(_write(tmp_path, data))
    assert dag.stages["train_teacher"].dask_resources() == {"GPU": 1}
    assert dag.stages["ingest"].dask_resources() is None


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "dags").glob("*.yaml")))
def test_shipped_dags_are_valid(name: str) -> None:
    try:
        dag = load_dag(REPO / "dags" / name)
    except CalodistillError as exc:
        # a DAG on a real data file that is not here: valid once the input points somewhere that exists
        assert "inputs.sources" in str(exc) and "does not exist" in str(exc)
        dag = load_dag(REPO / "dags" / name, ['ingest.inputs.sources=["synth:calogan?n=10"]'])
    assert dag.order[0] == "ingest"
    kinds = {s.kind for s in dag.stages.values()}
    assert {"ingest", "train_teacher", "distill", "generate", "evaluate"} <= kinds
    assert dag.tracking.registered_model
