"""``calodistill train-teacher`` and ``calodistill distill`` end to end on a tiny synthetic dataset, and their configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from calodistill.pipeline.cli import main
from calodistill.pipeline.config import (
    build_config,
    load_config_file,
    parse_set,
    set_sources,
)
from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.stages.train_teacher import TeacherTrainConfig

TINY_TEACHER = [
    "--set", "flow1.model.n_blocks=1", "--set", "flow1.model.hidden_features=8",
    "--set", "flow1.train.epochs=1", "--set", "teacher.model.n_blocks=1",
    "--set", "teacher.model.hidden_features=8", "--set", "teacher.model.num_bins=2",
    "--set", "teacher.train.epochs=1", "--set", "check_samples=3", "--set", "check_batch_size=3",
]
TINY_STUDENT = [
    "--set", "train.epochs=1", "--set", "distill.kl_samples=16", "--set", "nll_subset=4",
    "--set", "check_samples=8", "--set", "teacher_check_samples=2",
]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from calodistill.pipeline.data.ingest import ingest_showers

    out = tmp_path_factory.mktemp("data") / "calogan"
    ingest_showers(["synth:calogan?n=120&seed=3"], out, scheduler="synchronous", progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_teacher(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("models") / "teacher"
    rc = main(["train-teacher", "--data", str(tiny_dataset), "--out", str(out), "--device", "cpu", "--quiet", *TINY_TEACHER])
    assert rc == 0
    return out


def test_train_teacher_cli_writes_model_dir(tiny_teacher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("preprocessing.json", "flow1.pt", "teacher.pt", "metrics.json", "history.json", "train_config.json",
                 "checkpoints/flow1/last.pt", "checkpoints/flow1/best.pt", "checkpoints/teacher/last.pt"):
        assert (tiny_teacher / name).is_file(), name
    metrics = json.loads((tiny_teacher / "metrics.json").read_text())
    for key in ("test_nll", "baseline_nll", "flow1_test_nll", "test_nll_per_dim", "layer_frac_max_rel_diff",
                "response_gen", "response_data", "flow1_response_gen"):
        assert math.isfinite(metrics[key]), key
    assert metrics["teacher_epochs"] == 1 and metrics["n_voxels"] == 504
    assert json.loads((tiny_teacher / "train_config.json").read_text())["teacher"]["model"]["hidden_features"] == 8
    ckpt = torch.load(tiny_teacher / "checkpoints" / "teacher" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1


def test_train_teacher_rerun_resumes_without_training(tiny_teacher: Path, tiny_dataset: Path) -> None:
    from calodistill.pipeline.stages.train_teacher import train_teacher

    calls: list[int] = []
    cfg = dict(parse_set(a) for a in TINY_TEACHER if a != "--set") | {"progress": False}
    metrics = train_teacher(tiny_dataset, tiny_teacher, cfg, log_metrics=lambda m, s: calls.append(s), device="cpu")
    assert calls == [1]  # only the final summary: both flows were complete
    assert metrics["teacher_epochs"] == 1


def test_distill_cli_writes_self_contained_student(tiny_teacher: Path, tiny_dataset: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from calodistill.flows.serialization import load_generator

    out = tmp_path / "student"
    rc = main(["distill", "--teacher", str(tiny_teacher), "--data", str(tiny_dataset), "--out", str(out),
               "--device", "cpu", "--quiet", *TINY_STUDENT])
    assert rc == 0
    assert "student written to" in capsys.readouterr().out
    for name in ("preprocessing.json", "flow1.pt", "student.pt", "metrics.json", "checkpoints/student/best.pt"):
        assert (out / name).is_file(), name
    assert not (out / "teacher.pt").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_nll", "teacher_test_nll", "kl_student_teacher", "student_sample_nll", "layer_frac_max_rel_diff",
                "response_rel_diff", "paired_rms"):
        assert math.isfinite(metrics[key]), key
    gen = load_generator(out)
    assert gen.kind == "student"
    assert gen.sample([50_000.0, 60_000.0], device="cpu").shape == (2, 504)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "teacher.train.epochz=3"], "--set teacher.train.epochz=3: unknown key 'teacher.train.epochz'"),
        (["--set", "nosuch=1"], "--set nosuch=1: unknown key 'nosuch'"),
        (["--set", "teacher.train.epochs=many"], "--set teacher.train.epochs=many: teacher.train.epochs: expected an integer"),
        (["--set", "teacher.train.schedule=linear"],
         "--set teacher.train.schedule=linear: teacher.train.schedule: must be one of"),
        (["--set", "epochs"], "--set epochs: expected KEY=VALUE"),
    ],
)
def test_bad_set_key_exits_2_with_one_line(argv: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train-teacher", "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "m"), *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("calodistill: error: ") and message in err and err.count("\n") == 1, err


def test_distill_bad_set_key_and_missing_teacher(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["distill", "--teacher", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "s"),
               "--set", "student.width=3"])
    assert rc == 2 and "unknown key 'student.width'" in capsys.readouterr().err
    rc = main(["distill", "--teacher", str(tmp_path), "--data", str(tmp_path), "--out", str(tmp_path / "s")])
    assert rc == 2 and "missing preprocessing.json" in capsys.readouterr().err


def test_config_file_unknown_key_names_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "teacher.yaml"
    cfg.write_text("teacher:\n  train:\n    epochs: 3\n  modle:\n    n_blocks: 2\n")
    rc = main(["train-teacher", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{cfg}: unknown key 'teacher.modle'" in err


def test_build_config_layers_defaults_file_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"teacher": {"train": {"epochs": 3, "lr": 1e-4}}, "flow1.model.kind": "affine"}))
    cfg = build_config(TeacherTrainConfig, (load_config_file(f), str(f)),
                       *set_sources(["teacher.train.epochs=7", "progress=false"]))
    assert cfg.teacher.train.epochs == 7 and cfg.teacher.train.lr == 1e-4
    assert cfg.flow1.model.kind == "affine" and cfg.progress is False
    assert cfg.flow1.model.n_blocks == 6 and cfg.teacher.model.n_blocks == 8  # untouched defaults
    assert TeacherTrainConfig().teacher.train.epochs == 50  # defaults are not mutated
    with pytest.raises(CalodistillError, match=r"x.yaml: not valid YAML|cannot read"):
        load_config_file(tmp_path / "x.yaml")


def _records(model_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(model_dir.glob("*.json"))}


def test_provenance_records_data_settings_and_energy_range(tiny_teacher: Path, tiny_dataset: Path) -> None:
    from calodistill.pipeline.data.bundle import ModelBundle
    from calodistill.pipeline.data.dataset import dataset_hash, open_dataset

    bundle = ModelBundle.open(tiny_teacher)
    record = bundle.provenance["provenance"]
    assert record["stage"] == "train-teacher" and record["dataset_digest"] == dataset_hash(tiny_dataset)
    assert record["config"]["teacher"]["model"]["hidden_features"] == 8 and "progress" not in record["config"]
    train = open_dataset(tiny_dataset).load("train")
    assert bundle.energy_range == (float(train.incident_energy.min()), float(train.incident_energy.max()))
    assert bundle.geometry.name == "calogan" and bundle.particle == "e+"


def test_rerun_with_other_data_or_settings_is_refused_and_changes_nothing(
        tiny_teacher: Path, tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from calodistill.pipeline.data.ingest import ingest_showers

    other = tmp_path / "other"
    ingest_showers(["synth:calogan?n=120&seed=4"], other, scheduler="synchronous", progress=False)
    before = _records(tiny_teacher)
    base = ["train-teacher", "--out", str(tiny_teacher), "--device", "cpu", "--quiet", *TINY_TEACHER]
    rc = main([*base, "--data", str(other)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"--out {tiny_teacher}: holds a train-teacher run made from other inputs or settings" in err
    assert f"dataset {tiny_dataset.resolve()} (digest " in err and f"vs {other.resolve()} (digest " in err
    assert "pass --overwrite" in err
    rc = main([*base, "--data", str(tiny_dataset), "--set", "teacher.train.epochs=2", "--set", "seed=7"])
    err = capsys.readouterr().err
    assert rc == 2 and "seed 0 vs 7; teacher.train.epochs 1 vs 2" in err, err
    assert _records(tiny_teacher) == before  # train_config.json, provenance.json, metrics.json untouched


def test_bad_data_or_out_leaves_nothing_behind(tiny_dataset: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    not_a_dataset = tmp_path / "empty"
    not_a_dataset.mkdir()
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for data, message in ((tmp_path / "missing", "no such dataset directory"),
                          (blocker, "not a directory"), (not_a_dataset, "not a calodistill dataset")):
        rc = main(["train-teacher", "--data", str(data), "--out", str(tmp_path / "new" / "model"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err
    for out, message in ((blocker, "is a file, not a directory"), (blocker / "model", "file.txt is a file, not a directory"),
                         (tmp_path, "is not a model directory written by calodistill")):
        rc = main(["train-teacher", "--data", str(tiny_dataset), "--out", str(out), "--device", "cpu"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file.txt"]


def test_overwrite_starts_over_but_never_replaces_foreign_directories(tiny_teacher: Path, tiny_dataset: Path,
                                                                      tmp_path: Path) -> None:
    import shutil

    from calodistill.pipeline.stages.train_teacher import train_teacher

    model = tmp_path / "model"
    shutil.copytree(tiny_teacher, model)
    (model / "notes.json").write_text("{}")  # anything else in it: not ours to delete
    cfg = dict(parse_set(a) for a in TINY_TEACHER if a != "--set") | {"progress": False, "seed": 5}
    with pytest.raises(CalodistillError, match="is not a model directory written by calodistill"):
        train_teacher(tiny_dataset, model, cfg, device="cpu", overwrite=True)
    (model / "notes.json").unlink()
    metrics = train_teacher(tiny_dataset, model, cfg, device="cpu", overwrite=True)
    assert metrics["teacher_epochs"] == 1
    assert json.loads((model / "train_config.json").read_text())["seed"] == 5
    assert json.loads((model / "provenance.json").read_text())["config"]["seed"] == 5
