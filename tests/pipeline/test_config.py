"""pipeline/config.py: YAML-typed values, one ``--set`` parser, one typed loader for the CLI and the DAGs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from calodistill.flows.config import FlowConfig, TrainConfig
from calodistill.pipeline.cli.train_teacher import config_from_args
from calodistill.pipeline.config import (
    build_config,
    load_config_file,
    load_yaml,
    parse_set,
    parse_value,
    set_sources,
)
from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.orchestration.dag import load_dag
from calodistill.pipeline.stages.distill import DistillStageConfig
from calodistill.pipeline.stages.train_teacher import TeacherTrainConfig


@pytest.mark.parametrize(
    ("text", "value"),
    [("1e-3", 1e-3), ("2E5", 2e5), ("-1.5e+2", -150.0), ("0.001", 0.001), ("3", 3), ("[1, 2]", [1, 2]),
     ("true", True), ("false", False), ("cosine", "cosine"), ("'1e-3'", "1e-3"), ("", ""), ("null", None),
     ("{a: 1e-3}", {"a": 1e-3})],
)
def test_values_are_parsed_as_yaml(text: str, value: object) -> None:
    parsed = parse_value(text, "--set x")
    assert parsed == value and type(parsed) is type(value)


def test_1e_3_is_a_float_in_set_files_and_dags(tmp_path: Path) -> None:
    assert parse_set("teacher.train.lr=1e-3") == ("teacher.train.lr", 1e-3)
    f = tmp_path / "c.yaml"
    f.write_text("teacher:\n  train: {lr: 1e-3, epochs: 2}\n")
    assert load_config_file(f) == {"teacher": {"train": {"lr": 1e-3, "epochs": 2}}}
    assert isinstance(load_yaml("lr: 5e-4", "x")["lr"], float)
    assert yaml.safe_load("lr: 5e-4")["lr"] == "5e-4"  # what plain PyYAML does, and why the loader exists
    dag = _dag(tmp_path, {"seed": 1, "teacher": {"train": {"lr": "LR"}}}, raw_lr="1e-4")
    assert load_dag(dag).stages["train_teacher"].params["teacher"]["train"]["lr"] == 1e-4


def test_set_needs_key_and_value() -> None:
    for bad in ("epochs", "=3", "a..b=1"):
        with pytest.raises(CalodistillError, match=rf"--set {bad}: expected KEY=VALUE"):
            parse_set(bad)
    with pytest.raises(CalodistillError, match=r"--set a=\[1: invalid YAML"):
        parse_set("a=[1")


def test_loader_lays_sources_over_the_defaults() -> None:
    cfg = build_config(TeacherTrainConfig, ({"teacher": {"train": {"epochs": 3}}, "flow1.model.kind": "affine"}, "f"),
                       *set_sources(["teacher.train.lr=1e-4", "teacher.train.epochs=7", "progress=false"]))
    assert cfg.teacher.train == TrainConfig(epochs=7, lr=1e-4)
    assert cfg.flow1.model == FlowConfig(n_blocks=6, hidden_features=64, n_hidden_layers=2, kind="affine")
    assert cfg.progress is False and cfg.teacher.model.n_blocks == 8


def test_stage_defaults_are_the_ones_the_stages_always_had() -> None:
    t = TeacherTrainConfig()
    assert t.flow1.model == FlowConfig(n_blocks=6, hidden_features=64, n_hidden_layers=2)
    assert t.teacher.model == FlowConfig(n_blocks=8, hidden_features=0, n_hidden_layers=1)
    assert t.teacher.model.resolve(504, 4).hidden_features == 504  # hidden = D
    assert t.flow1.train == t.teacher.train == TrainConfig(epochs=50, batch_size=256, lr=1e-3, patience=10)
    d = DistillStageConfig()
    assert d.train == TrainConfig(schedule="cosine") and d.student == {"dropout": 0.0}


def test_student_changes_merge_key_by_key() -> None:
    cfg = build_config(DistillStageConfig, ({"student": {"hidden_features": 736}}, "f.yaml"),
                       *set_sources(["student.n_hidden_layers=2"]))
    assert cfg.student == {"dropout": 0.0, "hidden_features": 736, "n_hidden_layers": 2}
    with pytest.raises(CalodistillError, match=r"^--set student.kind=affine: unknown key 'student.kind' \(known: "
                                               r"student.hidden_features, "):
        build_config(DistillStageConfig, *set_sources(["student.kind=affine"]))
    with pytest.raises(CalodistillError, match=r"^f.yaml: student.hidden_features: expected an integer, got 'wide'$"):
        build_config(DistillStageConfig, ({"student": {"hidden_features": "wide"}}, "f.yaml"))
    with pytest.raises(CalodistillError, match=r"^--set student.activation=swish: student.activation: must be one of"):
        build_config(DistillStageConfig, *set_sources(["student.activation=swish"]))


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ([({"teacher": {"train": {"epochz": 3}}}, "t.yaml")],
         "t.yaml: unknown key 'teacher.train.epochz' (known: teacher.train.epochs, teacher.train.batch_size, "),
        (set_sources(["nosuch=1"]), "--set nosuch=1: unknown key 'nosuch' (known: seed, progress, "),
        ([({"teacher": {"model": 3}}, "t.yaml")], "t.yaml: teacher.model: expected a mapping of settings, got 3"),
    ],
)
def test_unknown_keys_fail_in_one_line_naming_key_and_source(sources: list, message: str) -> None:
    with pytest.raises(CalodistillError) as info:
        build_config(TeacherTrainConfig, *sources)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        (set_sources(["teacher.train.epochs=many"]),
         "--set teacher.train.epochs=many: teacher.train.epochs: expected an integer, got 'many'"),
        ([({"seed": 1.5}, "t.yaml")], "t.yaml: seed: expected an integer, got 1.5"),
        ([({"progress": "yes"}, "t.yaml")], "t.yaml: progress: expected true or false, got 'yes'"),
        ([({"teacher.model.features": "D"}, "t.yaml")],
         "t.yaml: teacher.model.features: expected an integer or null, got 'D'"),
        # values the flows' dataclasses reject are blamed on the source that set them
        ([({"seed": 1}, "t.yaml"), *set_sources(["teacher.model.kind=cubic"])],
         "--set teacher.model.kind=cubic: teacher.model.kind: must be one of spline, affine, got 'cubic'"),
        ([({"teacher": {"train": {"lr": -1e-3}}}, "t.yaml")],
         "t.yaml: teacher.train.lr: must be a number in (0, inf), got -0.001"),
    ],
)
def test_wrong_types_fail_in_one_line_naming_key_and_source(sources: list, message: str) -> None:
    with pytest.raises(CalodistillError) as info:
        build_config(TeacherTrainConfig, *sources)
    assert str(info.value) == message


# ----------------------------------------------------------------------------------------- DAG and CLI


def _dag(tmp_path: Path, teacher_params: dict, raw_lr: str | None = None) -> Path:
    data = {
        "name": "demo",
        "stages": {
            "ingest": {"kind": "ingest", "inputs": {"sources": ["synth:calogan?n=100"]}, "outputs": ["dataset"]},
            "train_teacher": {"kind": "train_teacher", "inputs": {"data": "ingest.dataset"}, "outputs": ["model"],
                              "params": teacher_params},
        },
    }
    text = yaml.safe_dump(data, sort_keys=False)
    if raw_lr is not None:
        text = text.replace("LR", raw_lr)
    path = tmp_path / "demo.yaml"
    path.write_text(text)
    return path


def test_dag_params_errors_name_the_stage_and_the_file_or_the_set(tmp_path: Path) -> None:
    path = _dag(tmp_path, {"teacher": {"train": {"epochz": 3}}})
    with pytest.raises(CalodistillError, match=r"^\S*demo.yaml: stage 'train_teacher': params: unknown key "
                                               r"'teacher.train.epochz' \(known: teacher.train.epochs, "):
        load_dag(path)
    path = _dag(tmp_path, {"teacher": {"train": {"epochs": 3}}})
    with pytest.raises(CalodistillError) as info:
        load_dag(path, ["train_teacher.seed=2", "train_teacher.teacher.train.lr=fast"])
    assert str(info.value) == (f"{path}: --set train_teacher.teacher.train.lr=fast: stage 'train_teacher': "
                               "params: teacher.train.lr: expected a number, got 'fast'")
    with pytest.raises(CalodistillError, match=r"demo.yaml: --set train_teacher.teacher.modle.kind=affine: "
                                               r"stage 'train_teacher': params: unknown key 'teacher.modle'"):
        load_dag(path, ["train_teacher.teacher.modle.kind=affine"])
    # a file that is wrong by itself is blamed on the file, even with a --set beside it
    path = _dag(tmp_path, {"teacher": {"train": {"epochs": "three"}}})
    with pytest.raises(CalodistillError, match=r"demo.yaml: stage 'train_teacher': params: teacher.train.epochs: "
                                               r"expected an integer"):
        load_dag(path, ["train_teacher.seed=2"])


def test_dag_and_cli_give_the_same_config(tmp_path: Path) -> None:
    params = {"seed": 3, "flow1": {"model": {"n_blocks": 2}}, "teacher": {"train": {"epochs": 2, "lr": 0.01}}}
    sets = ["teacher.train.lr=1e-3", "teacher.model.hidden_features=32", "teacher.train.schedule=cosine",
            "preprocessing.alpha=1e-5", "progress=false"]
    dag = load_dag(_dag(tmp_path, params), [f"train_teacher.{s}" for s in sets])
    from_dag = build_config(TeacherTrainConfig, (dag.stages["train_teacher"].params, "params"))

    cfg_file = tmp_path / "teacher.yaml"
    cfg_file.write_text(yaml.safe_dump(params))
    args = argparse.Namespace(config=cfg_file, overrides=sets, quiet=False)
    from_cli = config_from_args(TeacherTrainConfig, args)
    assert from_dag == from_cli
    assert from_cli.teacher.train.lr == 1e-3 and from_cli.preprocessing.alpha == 1e-5
    assert from_cli.teacher.model.hidden_features == 32 and from_cli.flow1.model.n_blocks == 2
