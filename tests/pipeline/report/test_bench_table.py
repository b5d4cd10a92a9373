"""The benchmark's markdown: the set-up lines, a row per batch, † notes for replaced batches."""

from __future__ import annotations

from typing import Any

from calodistill.pipeline.report.bench_table import _fmt, render_markdown


def _timing(batch: int, ms: float, note: str = "") -> dict[str, Any]:
    return {"batch": batch, "ms_per_shower": ms, "median_s": ms * batch / 1e3, "note": note}


def _result() -> dict[str, Any]:
    flow = {"n_blocks": 2, "hidden_features": 8, "n_hidden_layers": 1, "parameters": 1234}
    return {
        "device_info": {"device": "cpu", "gpu": None, "cpu": "Test CPU", "cpu_count": 2, "torch": "2.x",
                        "torch_threads": 1, "load_average": [0.5, 0.4, 0.3], "load_average_end": None},
        "geometry": None, "features": 6, "context_features": 2, "models": "random-initialised", "dtype": "float32",
        "teacher": flow, "student": flow, "repeats": 3, "warmup": 1, "budget_s": 5.0,
        "sampling": {"flops_per_shower": 2e6, "flops_per_shower_executed": 1e6, "output_groups": 2,
                     "chunk_size": 256, "spline": "torch ops", "rows": [
                         {"batch": 1, "teacher": _timing(1, 2.0), "student_iaf": _timing(1, 0.5),
                          "student_fast": _timing(1, 0.1), "speedup_fast": 20.0, "student_gflops": 0.01},
                         {"batch": 1000, "teacher": _timing(100, 1.5, "batch 1000 exceeds the 5 s budget"),
                          "student_iaf": _timing(1000, 0.05), "student_fast": _timing(1000, 0.01),
                          "speedup_fast": 150.0, "student_gflops": 0.1}]},
    }


def test_render_markdown() -> None:
    md = render_markdown(_result())
    assert md.startswith("Device: cpu; CPU: Test CPU, 2 cores")
    assert "load average at start 0.5/0.4/0.3, at end n/a" in md
    assert "| 1 | 2 | 0.5 | 0.1 | 20× (batch 1) |" in md
    assert "| 1,000 | 1.5 (at batch 100)† |" in md and "† teacher: batch 1000 exceeds the 5 s budget." in md
    assert "none is extrapolated" in md and "training" not in md and md.endswith("\n")


def test_fmt() -> None:
    assert _fmt(None) == "—" and _fmt(float("nan")) == "—" and _fmt(0) == "0"
    assert _fmt(12345.6) == "12,346" and _fmt(0.012345) == "0.0123"
