"""The evaluation stage: metrics.json / plots / report.md on tiny synthetic inputs, the CLI, the
CaloChallenge layout check against the binning XML, and the model metrics on a tiny untrained pair."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import h5py
import numpy as np
import pytest

from calodistill.pipeline.cli import main
from calodistill.pipeline.data.formats import write_showers
from calodistill.pipeline.data.geometry import Geometry, Layer, get_geometry
from calodistill.pipeline.data.showers import Showers
from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.stages.evaluate import (
    check_calochallenge_layout,
    evaluate_showers,
    generated_labels,
)

FAST = {"hidden": [32, 32], "max_epochs": 15, "patience": 3, "batch_size": 64, "learning_rate": 3e-3}


def _showers(geometry: str, n: int, seed: int, scale: float = 1.0) -> Showers:
    """Showers with a smooth profile per layer (so observables are meaningful), exponential fluctuations."""
    geo = get_geometry(geometry)
    rng = np.random.default_rng(seed)
    e_inc = rng.uniform(1e3, 1e4, n)
    profile = np.concatenate([np.exp(-0.5 * (np.hypot(*layer.cell_xy()) / 60.0) ** 2) + 1e-3 for layer in geo.layers])
    profile /= profile.sum()
    vox = 0.9 * e_inc[:, None] * profile[None, :] * rng.exponential(1.0, (n, geo.n_voxels)) * scale
    return Showers(geo, e_inc, vox.astype(np.float32))


@pytest.fixture(scope="module")
def calogan_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("calogan")
    return {
        "reference": write_showers(_showers("calogan", 300, 0), d / "reference.h5"),
        "good": write_showers(_showers("calogan", 300, 1), d / "good.h5"),
        "bad": write_showers(_showers("calogan", 300, 2, scale=1.6), d / "bad.h5"),
    }


def test_evaluate_writes_metrics_plots_report(calogan_files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval"
    metrics = evaluate_showers(calogan_files["reference"], [calogan_files["good"], calogan_files["bad"]], out,
                               classifier=FAST, seed=0, bins=20)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for key in ("auc_low_good", "auc_high_good", "auc_low_bad", "auc_high_bad", "auc_baseline",
                "auc_high_baseline", "sep_max_good", "sep_max_bad", "sep_max_baseline", "sep_E_layer1_bad"):
        assert key in metrics, key
    assert metrics["auc_high_bad"] > 0.9 and metrics["sep_max_bad"] > 0.5
    assert abs(metrics["auc_high_good"] - 0.5) < 0.15 and metrics["sep_max_good"] < 0.2
    assert abs(metrics["auc_baseline"] - 0.5) < 0.2
    assert all(np.isfinite(v) for v in metrics.values())
    plots = {p.name for p in (out / "plots").rglob("*.png")}
    assert {"average_showers.png", "E.png", "Etot_over_Einc.png", "sparsity.png", "width_y.png"} <= plots
    report = (out / "report.md").read_text()
    assert "| bad |" in report and "baseline" in report and "CaloFlow student" in report
    assert "`E_layer" in report
    details = json.loads((out / "details.json").read_text())
    assert set(details["separation_power"]) == {"good", "bad", "baseline"}


def test_classifier_gets_equal_sample_sizes(calogan_files: dict[str, Path], tmp_path: Path) -> None:
    """A larger sample must not get a stronger classifier: every sample enters with the smallest size."""
    small = write_showers(_showers("calogan", 120, 5), tmp_path / "small.h5")
    kwargs = dict(classifier=FAST, seed=0, bins=20, plots=False, timing_batch_sizes=())
    metrics = evaluate_showers(calogan_files["reference"], [calogan_files["good"], small], tmp_path / "eq", **kwargs)
    assert metrics["n_good"] == 300 and metrics["n_small"] == 120 and metrics["n_classifier"] == 120
    details = json.loads((tmp_path / "eq" / "details.json").read_text())["classifier"]
    sizes = {label: sum(details[f"high_{label}"][k] for k in ("n_train", "n_val", "n_test")) for label in ("good", "small")}
    assert sizes["good"] == sizes["small"]  # generated + reference showers (the test balances the classes)
    assert "Each generated sample enters with 120 showers" in (tmp_path / "eq" / "report.md").read_text()
    # opting out: every shower, and no n_classifier
    metrics = evaluate_showers(calogan_files["reference"], [calogan_files["good"], small], tmp_path / "all",
                               classifier_equal_sizes=False, **kwargs)
    assert "n_classifier" not in metrics
    details = json.loads((tmp_path / "all" / "details.json").read_text())["classifier"]
    assert sum(details["high_good"][k] for k in ("n_train", "n_val", "n_test")) > sizes["small"]


def test_classifier_seeds_report_mean_spread_and_each_value(calogan_files: dict[str, Path], tmp_path: Path) -> None:
    """With several classifier seeds the plain names hold the mean; the spread and each value are kept."""
    gen = {"teacher": calogan_files["good"], "student": calogan_files["bad"]}
    kwargs = dict(classifier=FAST, seed=0, bins=20, plots=False, timing_batch_sizes=())
    one = evaluate_showers(calogan_files["reference"], gen, tmp_path / "one", run_classifier=True, **kwargs)
    metrics = evaluate_showers(calogan_files["reference"], gen, tmp_path / "two", classifier_seeds=[0, 5], **kwargs)
    assert "auc_low_student_std" not in one and "auc_low_student_seed0" not in one
    for key in ("auc_low_student", "auc_high_teacher", "auc_low_baseline"):
        values = [metrics[f"{key}_seed0"], metrics[f"{key}_seed5"]]
        assert metrics[key] == pytest.approx(np.mean(values)) and metrics[f"{key}_std"] == pytest.approx(np.std(values))
        assert metrics[f"{key}_seed0"] == one[key]  # seed 0 is the single-seed run (the evaluation's seed)
    assert metrics["auc_low_student_minus_teacher"] == pytest.approx(metrics["auc_low_student"] - metrics["auc_low_teacher"])
    assert "auc_high_student_minus_teacher_std" in metrics and "jsd_low_student_std" in metrics
    details = json.loads((tmp_path / "two" / "details.json").read_text())["classifier"]
    assert details["seeds"] == [0, 5] and [r["seed"] for r in details["low_student"]["runs"]] == [0, 5]
    report = (tmp_path / "two" / "report.md").read_text()
    assert "over 2 classifier seeds (0, 5)" in report
    assert f"| student | {metrics['auc_low_student']:.3f} ± {metrics['auc_low_student_std']:.3f} |" in report
    assert "Student AUC minus teacher AUC" in report
    with pytest.raises(CalodistillError, match="classifier_seeds"):
        evaluate_showers(calogan_files["reference"], gen, tmp_path / "bad", classifier_seeds=[1, 1], **kwargs)


def test_cli_evaluate_and_bad_input(calogan_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    rc = main(["evaluate", "--reference", str(calogan_files["reference"]), "--generated",
               f"student={calogan_files['good']}", "--out", str(out), "--no-classifier", "--no-plots"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "sep_max_student" in metrics and "auc_low_student" not in metrics
    assert (out / "report.md").is_file()
    assert "sep_max_student" in capsys.readouterr().out

    missing = tmp_path / "nope.h5"
    assert main(["evaluate", "--reference", str(calogan_files["reference"]), "--generated", str(missing),
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("calodistill: error:") and "nope.h5" in err[0]

    other = write_showers(_showers("calochallenge-1-photons", 20, 0), tmp_path / "other.h5")
    assert main(["evaluate", "--reference", str(calogan_files["reference"]), "--generated", str(other),
                 "--out", str(tmp_path / "y"), "--no-classifier", "--no-plots"]) == 2
    assert "calodistill: error:" in capsys.readouterr().err

    help_text = pytest.raises(SystemExit, main, ["evaluate", "--help"])
    assert help_text.value.code == 0
    assert "Example" in capsys.readouterr().out


def test_labels() -> None:
    assert list(generated_labels(["a/teacher.h5", "b/student.parquet"])) == ["teacher", "student"]
    assert generated_labels(["x=some/file.h5"]) == {"x": Path("some/file.h5")}
    with pytest.raises(CalodistillError, match="given twice"):
        generated_labels(["a/student.h5", "b/student.h5"])
    with pytest.raises(CalodistillError, match="reserved"):
        generated_labels(["a/reference.h5"])


def _xml_voxels(xml_path: Path) -> int:
    """Voxels per shower from the binning XML itself: Σ over layers of n_alpha × n_radial_bins."""
    total = 0
    for layer in ET.parse(xml_path).getroot().iter("Layer"):
        n_r = len(layer.attrib["r_edges"].split(",")) - 1
        total += int(layer.attrib["n_bin_alpha"]) * max(n_r, 0)
    return total


@pytest.mark.parametrize("name,xml", [("calochallenge-1-photons", "binning_dataset_1_photons.xml"),
                                      ("calochallenge-2", "binning_dataset_2.xml")])
def test_calochallenge_layout_matches_binning_xml(name: str, xml: str, tmp_path: Path, shared_dir: Path) -> None:
    xml_path = shared_dir / "data" / "real" / "calochallenge-binning" / xml
    geo = get_geometry(name)
    assert geo.n_voxels == _xml_voxels(xml_path)
    showers = _showers(name, 30, 0)
    path = write_showers(showers, tmp_path / "student.h5")
    assert check_calochallenge_layout(path, str(xml_path)) == 30
    assert check_calochallenge_layout(path, name) == 30
    with h5py.File(path, "r") as f:
        assert f["incident_energies"].shape == (30, 1) and f["showers"].shape == (30, geo.n_voxels)
        np.testing.assert_allclose(f["showers"][:], showers.voxels)
        np.testing.assert_allclose(f["incident_energies"][:, 0], showers.incident_energy)
    # voxel order (layer, alpha, r): the per-layer sums computed with the XML's layer sizes agree
    sizes = [int(l.attrib["n_bin_alpha"]) * (len(l.attrib["r_edges"].split(",")) - 1)
             for l in ET.parse(xml_path).getroot().iter("Layer") if len(l.attrib["r_edges"].split(",")) > 1]
    bounds = np.cumsum([0, *sizes])
    sums = np.stack([showers.voxels[:, a:b].sum(1) for a, b in zip(bounds[:-1], bounds[1:])], axis=1)
    np.testing.assert_allclose(sums, showers.layer_energies, rtol=1e-5)


def test_calochallenge_layout_rejects_bad_files(tmp_path: Path) -> None:
    geo = get_geometry("calochallenge-1-photons")
    def write(name: str, **dsets: np.ndarray) -> Path:
        p = tmp_path / name
        with h5py.File(p, "w") as f:
            for k, v in dsets.items():
                f.create_dataset(k, data=v)
        return p
    good_e = np.full((5, 1), 1000.0)
    cases = {
        "missing": ({"showers": np.zeros((5, geo.n_voxels))}, "incident_energies"),
        "voxels": ({"incident_energies": good_e, "showers": np.zeros((5, geo.n_voxels - 1))}, "shape"),
        "eshape": ({"incident_energies": good_e[:, 0], "showers": np.zeros((5, geo.n_voxels))}, r"\(N, 1\)"),
        "rows": ({"incident_energies": good_e[:4], "showers": np.zeros((5, geo.n_voxels))}, "4 incident"),
        "negative": ({"incident_energies": good_e, "showers": -np.ones((5, geo.n_voxels))}, "negative"),
        "nan": ({"incident_energies": good_e, "showers": np.full((5, geo.n_voxels), np.nan)}, "NaN"),
        "zero_e": ({"incident_energies": 0 * good_e, "showers": np.zeros((5, geo.n_voxels))}, "positive"),
    }
    for name, (dsets, message) in cases.items():
        with pytest.raises(CalodistillError, match=message):
            check_calochallenge_layout(write(f"{name}.h5", **dsets), geo)
    with pytest.raises(CalodistillError, match="HDF5"):
        (tmp_path / "text.h5").write_text("not hdf5")
        check_calochallenge_layout(tmp_path / "text.h5", geo)


def _tiny_model_dirs(tmp_path: Path, showers: Showers) -> tuple[Path, Path]:
    import torch

    from calodistill.flows.config import flow1_config, teacher_config
    from calodistill.flows.models import MAF, build_iaf_like
    from calodistill.flows.preprocessing import CaloFlowPreprocessor
    from calodistill.flows.serialization import save_generator_dir

    torch.manual_seed(0)
    geo = showers.geometry
    pre = CaloFlowPreprocessor(geo.layer_sizes).fit(showers.incident_energy, showers.voxels)
    f1cfg = flow1_config(geo.n_layers, n_blocks=2, hidden_features=8)
    f2cfg = teacher_config(geo.n_voxels, geo.n_layers, n_blocks=2, hidden_features=16, num_bins=4)
    flow1, teacher = MAF(f1cfg), MAF(f2cfg)
    student = build_iaf_like(teacher)  # same blocks and permutations, its own (untrained) weights
    save_generator_dir(tmp_path / "teacher", pre, flow1, f1cfg, teacher, f2cfg, kind="teacher")
    save_generator_dir(tmp_path / "student", pre, flow1, f1cfg, student, student.config, kind="student")
    # training histories as pipeline.train / pipeline.distill write them: one list of epoch dicts per flow
    epochs = [{"epoch": 1.0, "train_nll": 3.0, "val_nll": 3.2}, {"epoch": 2.0, "train_nll": 2.5, "val_nll": 2.9}]
    (tmp_path / "teacher" / "history.json").write_text(json.dumps({"flow1": epochs, "teacher": epochs}))
    (tmp_path / "student" / "history.json").write_text(json.dumps({"student": [{"epoch": 1.0, "kl": 0.5}]}))
    return tmp_path / "teacher", tmp_path / "student"


def _tiny_geometry() -> Geometry:
    """Two small Cartesian layers (3×4 and 2×2 cells): MAF sampling costs one pass per voxel."""
    edges = lambda n: tuple(float(v) for v in np.linspace(-40.0, 40.0, n + 1))  # noqa: E731
    return Geometry("tiny", (Layer(0, "cartesian", edges(3), edges(4)), Layer(1, "cartesian", edges(2), edges(2))))


def test_model_metrics_with_tiny_untrained_flows(tmp_path: Path) -> None:
    geo = _tiny_geometry()
    rng = np.random.default_rng(3)
    e_inc = rng.uniform(1e3, 1e4, 60)
    ref = Showers(geo, e_inc, (e_inc[:, None] / 20 * rng.exponential(1.0, (60, geo.n_voxels))).astype(np.float32))
    teacher_dir, student_dir = _tiny_model_dirs(tmp_path, ref)
    metrics = evaluate_showers(ref, [], tmp_path / "eval", teacher_dir=teacher_dir, student_dir=student_dir,
                               run_classifier=False, timing_batch_sizes=(1, 10), student_nll_max_showers=8,
                               kl_samples=50, n_energy_bins=2, model_samples=40, seed=0, bins=10,
                               observable_plots=False)
    for key in ("nll_teacher", "nll_teacher_subset", "nll_student_subset", "kl_student_teacher",
                "nll_teacher_ebin0", "kl_student_teacher_ebin1", "time_ms_per_shower_teacher_b1",
                "time_ms_per_shower_student_b10", "sep_max_teacher", "sep_max_student", "n_teacher"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["n_teacher"] == 40
    # both models' exact NLL on the same 8 showers, readable from the metrics
    assert metrics["test_nll_showers"] == 8
    assert metrics["test_nll_teacher"] == pytest.approx(metrics["nll_teacher_subset"])
    assert metrics["test_nll_student"] == pytest.approx(metrics["nll_student_subset"])
    rel = (metrics["test_nll_student"] - metrics["test_nll_teacher"]) / abs(metrics["test_nll_teacher"])
    assert metrics["test_nll_rel_diff"] == pytest.approx(rel)
    assert np.isfinite(metrics["test_nll_flow2_rel_diff"]) and metrics["likelihood_seconds"] > 0
    plots = {p.name for p in (tmp_path / "eval" / "plots").rglob("*.png")}
    assert {"nll_per_energy_bin.png", "kl_per_energy_bin.png", "average_showers.png", "training_teacher.png",
            "training_teacher_flow1.png", "training_student.png"} <= plots
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "KL(student" in report and "| student |" in report
    assert "Exact NLL of both models on the same 8 reference showers" in report and "| Flow II alone |" in report
