"""Your own detector, end to end on the command line (README "Your own detector"): a small ROOT file written
with uproot (a Cartesian detector, log10 keV cell energies with a sentinel, mixed particles as PDG codes),
ingested with a geometry YAML and a column mapping, a tiny teacher and student, generate and evaluate. The
geometry is given once, to ingest: every later command takes it from the dataset or the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calodistill.pipeline.cli import main
from calodistill.pipeline.data.geometry import get_geometry
from calodistill.pipeline.data.synth import SynthSpec, generate_showers

uproot = pytest.importorskip("uproot")

GEOMETRY = """\
name: my-calo
layers:
  - {nx: 4, ny: 4, cell_mm: 15, thickness_mm: 40, repeat: 3}
material: {x0_mm: 25.9, moliere_mm: 41.3, critical_energy_mev: 13.4}
"""
COLUMNS = """\
tree: sim
incident_energy: E_beam
energy_unit: GeV
voxels: edep
voxel_unit: keV
voxel_encoding: log10
empty_value: -5
particle: pdg
particle_codes: pdg
"""
TINY_TEACHER = ["--set", "flow1.model.n_blocks=1", "--set", "flow1.model.hidden_features=8", "--set", "flow1.train.epochs=1",
                "--set", "teacher.model.n_blocks=1", "--set", "teacher.model.hidden_features=8",
                "--set", "teacher.model.num_bins=2", "--set", "teacher.train.epochs=1", "--set", "check_samples=3",
                "--set", "check_batch_size=3"]
TINY_STUDENT = ["--set", "train.epochs=1", "--set", "distill.kl_samples=16", "--set", "nll_subset=4",
                "--set", "check_samples=8", "--set", "teacher_check_samples=2"]


def _write_user_root_file(path: Path, geometry_file: Path) -> int:
    """What a Geant4 job might write: ``edep[layer][row][column]`` = log10(E/keV), -5 where empty."""
    parts = [generate_showers(SynthSpec(str(geometry_file), 80, seed=i, particle=p, energy=None))
             for i, p in enumerate(("gamma", "e-", "e+"))]
    e_gev = np.concatenate([s.incident_energy for s in parts]) / 1e3
    kev = np.concatenate([s.voxels for s in parts]).astype(np.float64) * 1e3
    edep = np.where(kev > 0, np.log10(np.where(kev > 0, kev, 1.0)), -5.0).reshape(-1, 3, 4, 4)
    pdg = np.repeat(np.array([22, 11, -11], dtype=np.int32), 80)
    order = np.random.default_rng(0).permutation(len(pdg))
    with uproot.recreate(path) as f:
        t = f.mktree("sim", {"E_beam": np.float64, "edep": (np.float64, (3, 4, 4)), "pdg": np.int32})
        t.extend({"E_beam": e_gev[order], "edep": edep[order], "pdg": pdg[order]})
    return len(pdg)


def test_own_detector_from_root_to_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    geometry, columns = tmp_path / "geometry.yaml", tmp_path / "columns.yaml"
    geometry.write_text(GEOMETRY)
    columns.write_text(COLUMNS)
    n = _write_user_root_file(tmp_path / "run1.root", geometry)
    data, teacher, student = tmp_path / "data", tmp_path / "teacher", tmp_path / "student"

    assert main(["ingest", str(tmp_path / "run*.root"), "--out", str(data), "--geometry", str(geometry),
                 "--columns", str(columns), "--scheduler", "threads", "--no-progress"]) == 0
    assert f"ingested {n} showers (my-calo)" in capsys.readouterr().out
    assert main(["train-teacher", "--data", str(data), "--out", str(teacher), "--device", "cpu", "--quiet",
                 *TINY_TEACHER]) == 0
    assert main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(student), "--device", "cpu",
                 "--quiet", *TINY_STUDENT]) == 0
    for model in (teacher, student):  # the model carries the whole geometry
        record = json.loads((model / "provenance.json").read_text())["geometry"]
        assert record["name"] == "my-calo" and len(record["layers"]) == 3 and "medium" in record
    assert main(["generate", "--model", str(student), "-n", "40", "--energies", "uniform:1GeV:100GeV",
                 "--out", str(tmp_path / "student.h5"), "--device", "cpu", "--geometry", str(geometry)]) == 0
    assert "(my-calo, student" in capsys.readouterr().out
    assert main(["evaluate", "--reference", str(data), "--generated", str(tmp_path / "student.h5"),
                 "--out", str(tmp_path / "eval"), "--teacher", str(teacher), "--student", str(student),
                 "--device", "cpu", "--classifier-epochs", "1", "--timing-batches", "--model-samples", "20",
                 "--no-sample-missing", "--no-plots"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["n_reference"] > 0 and np.isfinite(metrics["sep_max_student"])
    assert np.isfinite(metrics["nll_teacher"]) and np.isfinite(metrics["auc_high_student"])
    details = json.loads((tmp_path / "eval" / "details.json").read_text())
    assert details["geometry"] == "my-calo"
    observables = set(details["separation_power"]["student"])  # Cartesian layers: x/y centroids and widths in mm
    assert {"centroid_x_layer0", "width_y_layer2", "E_layer1"} <= observables
    assert not any(k.startswith("radius") for k in observables)

    # a model only generates the geometry it was trained on
    capsys.readouterr()
    assert main(["generate", "--model", str(student), "-n", "5", "--out", str(tmp_path / "x.h5"),
                 "--geometry", "calogan"]) == 2
    err = capsys.readouterr().err
    assert "--geometry calogan is on geometry calogan" in err and "trained on my-calo" in err and err.count("\n") == 1
    assert not (tmp_path / "x.h5").exists()
    assert get_geometry(geometry).n_voxels == 48
