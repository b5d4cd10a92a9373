"""calodistill bench's ONNX Runtime rows (pipeline/stages/bench_onnx.py) and their table."""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from calodistill.pipeline.stages import bench  # noqa: E402
from tests.pipeline.stages.test_bench import TINY, _check_measured  # noqa: E402


def test_onnx_rows_beside_torch_with_ratios_from_the_same_run() -> None:
    result = bench.run_bench(**TINY, batches=[1, 3000], budget_s=0.05, sections=("onnx",))
    onnx = result["onnx"]
    assert onnx["providers"][0] == "cpu" and onnx["threads"] == 1
    assert set(onnx["graphs"]) == {"fp32", "fp16", "int8", "int8-dynamic"} and onnx["graphs"]["fp32"]["nodes"] > 0
    keys = ["onnx_cpu_fp32", "onnx_cpu_fp16", "onnx_cpu_int8", "onnx_cpu_int8-dynamic"]
    rows = {r["batch"]: r for r in onnx["rows"]}
    assert set(rows) == {1, 3000}
    for b, row in rows.items():
        for key in ("torch_fast", *keys):
            _check_measured(row[key], b)
        for key in keys:
            same = row[key]["batch"] == row["torch_fast"]["batch"]
            speedup = row[f"{key}_speedup"]
            assert (speedup is not None) == same
            if same:
                assert speedup == pytest.approx(row["torch_fast"]["ms_per_shower"] / row[key]["ms_per_shower"])
    fid = onnx["fidelity"]
    assert fid["onnx_cpu_fp32"]["max_abs_diff_x"] < 1e-3
    assert fid["onnx_cpu_fp16"]["median_abs_diff_x"] < 1e-2 and fid["onnx_cpu_int8"]["median_abs_diff_x"] < 0.1
    m = result["metrics"]
    assert m["onnx_cpu_int8_ms_per_shower_b1"] == rows[1]["onnx_cpu_int8"]["ms_per_shower"]
    assert m["onnx_cpu_fp32_speedup_b1"] == rows[1]["onnx_cpu_fp32_speedup"]
    md = result["markdown"]
    assert "ONNX Runtime" in md
    assert "| batch | torch FastIAFSampler ms/shower | onnxruntime CPU fp32 ms/shower | × |" in md
    assert md.count("\n| 1 |") == 1
