"""The ingest benchmark (pipeline/data/ingest_bench.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from calodistill.pipeline.data.ingest_bench import bench_ingest
from tests.pipeline.data.test_formats import make_showers


def test_bench_ingest_reports_both_rates(tmp_path: Path, cluster: str) -> None:
    res = bench_ingest(showers=make_showers("calogan", 300), scheduler=cluster, workdir=tmp_path)
    for key in ("ingest_showers_per_s", "ingest_mb_per_s", "baseline_showers_per_s", "baseline_mb_per_s", "ratio"):
        assert res[key] > 0
    assert res["n"] == 300 and res["n_voxels"] == 504
    assert res["ratio"] == pytest.approx(res["baseline_s"] / res["ingest_s"])
