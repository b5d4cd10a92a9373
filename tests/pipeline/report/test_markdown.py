"""The evaluation report: sections appear only with their metrics, missing values print as a dash."""

from __future__ import annotations

from calodistill.pipeline.data.geometry import get_geometry
from calodistill.pipeline.report.markdown import evaluation_report, fmt


def test_fmt() -> None:
    assert fmt(0.12345) == "0.123" and fmt(2.0, 1) == "2.0"
    assert fmt(None) == "–" and fmt(float("nan")) == "–"


def test_report_sections_follow_the_metrics() -> None:
    geo = get_geometry("calogan")
    metrics = {"n_reference": 300.0, "n_good": 300.0, "auc_low_good": 0.51, "auc_high_good": 0.55,
               "auc_low_baseline": 0.5, "sep_max_good": 0.1, "sep_mean_good": 0.05}
    details = {"separation_power": {"good": {"E_layer0": 0.1, "x": 0.2}, "baseline": {"E_layer0": 0.01}}}
    text = evaluation_report(metrics, details, geo, ["good"])
    assert text.startswith("# Shower evaluation") and text.endswith("\n")
    assert "**calogan** (504 voxels, 3 layers); 300 reference showers; generated: good (300)." in text
    assert "| good | 0.510 | 0.550 | – | – |" in text
    assert "| reference half vs half (baseline) | 0.500 | – |" in text
    assert "`x` 0.2000, `E_layer0` 0.1000 (baseline 0.0100)" in text
    assert "CaloFlow student" in text  # published numbers, for orientation
    assert "Likelihoods" not in text and "Sampling time" not in text and "layout" not in text

    metrics |= {"nll_teacher": -12.5, "time_ms_per_shower_student_b100": 0.25, "calochallenge_layout_ok_good": 1.0}
    details |= {"energy_bin_edges_mev": [1e3, 1e4, 1e5], "per_energy_bin": {"nll_teacher": [-12.0, None]},
                "timing_device": "cpu"}
    text = evaluation_report(metrics, details, geo, ["good"])
    assert "- teacher NLL: **-12.50** (per energy bin: 1000–10000 MeV: -12.00)" in text
    assert "## Sampling time per shower (ms, cpu)" in text and "| student | – | 0.250 | – |" in text
    assert "valid for: good." in text
