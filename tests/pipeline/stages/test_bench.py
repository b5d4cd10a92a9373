"""calodistill bench: structure of the results, the budget rule (nothing extrapolated), the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from calodistill.pipeline.cli import main
from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.stages import bench

TINY = dict(geometry=None, features=6, context_features=2, teacher_hidden=12, student_hidden=16, n_blocks=2,
            repeats=2, warmup=1, threads=1, train_steps=1, teacher_train_batch=8, student_train_batch=8)


def _check_measured(t: dict, requested: int) -> None:
    """A timing is at a batch no larger than requested, says why if smaller, and is self-consistent."""
    assert 1 <= t["batch"] <= requested
    assert (t["batch"] < requested) == bool(t["note"])
    assert len(t["seconds"]) == t["repeats"] >= 1
    assert math.isclose(t["ms_per_shower"], 1e3 * sorted(t["seconds"])[(len(t["seconds"]) - 1) // 2] / t["batch"]
                        if len(t["seconds"]) % 2 else 1e3 * (sorted(t["seconds"])[len(t["seconds"]) // 2 - 1]
                                                             + sorted(t["seconds"])[len(t["seconds"]) // 2]) / 2
                        / t["batch"])


def test_quick_bench_structure_and_budget() -> None:
    # a tiny budget forces the large batch to be replaced by the largest one that fits
    result = bench.run_bench(**TINY, batches=[1, 5000], budget_s=0.02, sections=("sampling", "floor", "training"))
    samp = result["sampling"]
    assert samp["flops_per_shower"] > 0
    rows = {r["batch"]: r for r in samp["rows"]}
    assert set(rows) == {1, 5000}
    for b, row in rows.items():
        for key in ("teacher", "teacher_dpass", "student_iaf", "student_fast"):
            _check_measured(row[key], b)
        assert row["floor"]["batch"] == row["student_fast"]["batch"]
        assert row["student_over_floor"] == pytest.approx(row["student_fast"]["median_s"] / row["floor"]["median_s"])
        same = row["student_fast_at_teacher_batch"]
        assert same["batch"] == row["teacher"]["batch"]
        assert row["speedup_fast"] == pytest.approx(row["teacher"]["ms_per_shower"] / same["ms_per_shower"])
    big = rows[5000]["teacher"]
    assert big["batch"] < 5000 and "exceeds" in big["note"]
    md = result["markdown"]
    assert "| batch | teacher ms/shower" in md and "none is extrapolated" in md
    assert samp["spline"].startswith("compiled (flows.native") and samp["spline"] in md
    assert f"(at batch {big['batch']})†" in md
    for name in ("teacher", "student"):
        tr = result["training"][name]
        assert tr["showers_per_s"] > 0 and tr["peak_memory_mb"] >= 0
        assert tr["steps_per_s"] == pytest.approx(1 / tr["median_step_s"])
        assert tr["matmuls_per_step"] > 0 and tr["matmul_gflop_per_step"] > 0
        assert tr["step_over_floor"] == pytest.approx(tr["median_step_s"] / tr["matmul_floor_s"])
    assert "local x-pass" in result["training"]["student"]["loss"]
    assert "| training | loss | batch | showers/s | steps/s | matmul floor ms/step | step / matmul floor" in md
    assert samp["teacher_sampler"].startswith("flows.teacher_sampling.FastMAFSampler") and "D passes" in md
    metrics = result["metrics"]
    assert all(isinstance(v, float) for v in metrics.values())
    assert "speedup_fast_b1" in metrics and "train_student_showers_per_s" in metrics
    assert "train_teacher_over_matmul_floor" in metrics and "teacher_dpass_ms_per_shower_b1" in metrics
    assert rows[1]["teacher_speedup_vs_dpass"] > 0
    json.dumps(result)  # JSON-able


def test_ingest_section_uses_bench_ingest() -> None:
    result = bench.run_bench(**TINY, sections=("ingest",), ingest_n=60, ingest_geometry="calogan",
                             ingest_scheduler="threads")
    ig = result["ingest"]
    assert ig["n"] == 60 and ig["ratio"] > 0 and ig["baseline_showers_per_s"] > 0
    assert "plain read + pyarrow.parquet.write_table" in result["markdown"]
    assert "sampling" not in result


def test_bench_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(CalodistillError, match="sections"):
        bench.run_bench(**TINY, sections=("nope",))
    with pytest.raises(CalodistillError, match="batches"):
        bench.run_bench(**TINY, batches=[0])
    with pytest.raises(CalodistillError, match="no such model directory"):
        bench.run_bench(**TINY, model_dirs=[tmp_path / "missing"])
    with pytest.raises(CalodistillError, match="no teacher.pt or student.pt"):
        bench.run_bench(**TINY, model_dirs=[tmp_path])


def test_bench_loads_trained_model_dir(tmp_path: Path) -> None:
    from calodistill.flows.config import FlowConfig
    from calodistill.flows.models import build_iaf_like, build_maf
    from calodistill.flows.serialization import save_flow

    teacher = build_maf(FlowConfig(features=5, context_features=1, n_blocks=2, hidden_features=8))
    student = build_iaf_like(teacher, hidden_features=10)
    save_flow(tmp_path / "student.pt", student)
    result = bench.run_bench(geometry=None, model_dirs=[tmp_path], batches=[1, 4], repeats=1, warmup=0,
                             threads=1, sections=("sampling",))
    assert result["student"]["hidden_features"] == 10 and result["features"] == 5
    assert result["model_sources"] == [str(tmp_path / "student.pt")]


def test_quickstart_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, int] = {}

    def training(*args: object) -> dict:
        seen.update(teacher_batch=args[4], student_batch=args[5])
        return {}

    monkeypatch.setattr(bench, "_training_section", training)
    result = bench.run_bench(preset="quickstart", sections=("training",), train_steps=1, threads=1)
    assert result["geometry"] == "calogan" and result["features"] == 504 and result["context_features"] == 4
    assert result["teacher"]["hidden_features"] == result["student"]["hidden_features"] == 64
    assert result["teacher"]["n_blocks"] == 4
    assert seen == {"teacher_batch": 256, "student_batch": 32}
    with pytest.raises(CalodistillError, match="preset"):
        bench.run_bench(**TINY, preset="nope")


def test_default_sizes() -> None:
    assert bench._default_sizes("calochallenge-1-photons", 368) == (378, 736)  # CaloFlow dataset-1 code
    assert bench._default_sizes("calogan", 504) == (504, 1008)


def test_cli_help_and_quick_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from calodistill.flows.config import FlowConfig
    from calodistill.flows.models import build_iaf_like, build_maf
    from calodistill.flows.serialization import save_flow

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "Example" in capsys.readouterr().out
    teacher = build_maf(FlowConfig(features=5, context_features=1, n_blocks=2, hidden_features=8))
    save_flow(tmp_path / "teacher.pt", teacher)
    save_flow(tmp_path / "student.pt", build_iaf_like(teacher, hidden_features=10))
    out = tmp_path / "b.json"
    code = main(["bench", "--model-dir", str(tmp_path), "--quick", "--batches", "1,3", "--sections", "sampling",
                 "--threads", "1", "--budget-s", "5", "--out", str(out), "--device", "cpu"])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["features"] == 5 and data["geometry"] is None and len(data["model_sources"]) == 2
    assert [r["batch"] for r in data["sampling"]["rows"]] == [1, 3]
    assert "| batch |" in capsys.readouterr().out
    assert main(["bench", "--batches", "x"]) == 2
    assert main(["bench", "--geometry", "calogan", "--model-dir", str(tmp_path)]) == 2  # 5 features ≠ 504 voxels
