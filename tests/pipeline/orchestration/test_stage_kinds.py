"""Stage kinds: the generate stage's parameters reach generate_showers_file as the CLI's options do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.orchestration.dag import load_dag
from calodistill.pipeline.orchestration.registry import StageContext, get_stage_kind
from tests.pipeline.stages.test_generate import make_model_dir


def _dag(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"name": "g", "stages": {
        "gen": {"kind": "generate", "inputs": {"model": str(tmp_path)}, "outputs": {"showers": "s.h5"},
                "params": params}}}))
    return path


def test_generate_allow_extrapolation_is_a_boolean_param(tmp_path: Path) -> None:
    dag = load_dag(_dag(tmp_path, {"n": 5, "energies": "1TeV", "allow_extrapolation": True}))
    assert dag.stages["gen"].params["allow_extrapolation"] is True
    with pytest.raises(CalodistillError, match=r"stage 'gen': params\.allow_extrapolation: expected true or false"):
        load_dag(_dag(tmp_path, {"n": 5, "allow_extrapolation": "yes please"}))


def test_generate_stage_refuses_extrapolation_unless_allowed(tmp_path: Path) -> None:
    model = make_model_dir(tmp_path / "model")
    (model / "provenance.json").write_text(json.dumps({"stage": "distill", "incident_energy_range": [1e3, 1e5]}))
    kind = get_stage_kind("generate")

    def context(params: dict) -> StageContext:
        work = tmp_path / "stage"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        return StageContext(stage="gen", kind="generate", inputs={"model": model},
                            outputs={"showers": work / "s.h5"}, work_dir=work,
                            params={"n": 4, "energies": "1TeV", "device": "cpu", **params},
                            log_metrics=lambda metrics, step: None)

    with pytest.raises(CalodistillError, match="outside the model's training range"):
        kind.run(context({}))
    result = kind.run(context({"allow_extrapolation": True}))
    assert result.metrics["n"] == 4
