"""The cluster (pipeline/orchestration/cluster.py): GPU stages without a GPU are refused before running."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.orchestration.runner import run_pipeline
from tests.pipeline.orchestration.test_runner import fake_dag


def test_gpu_stage_without_gpu_is_refused_before_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import calodistill.pipeline.orchestration.cluster as cluster

    monkeypatch.setattr(cluster, "cuda_devices", lambda: 0)
    log = tmp_path / "calls.log"
    data = yaml.safe_load(fake_dag(tmp_path, log).read_text())
    data["stages"]["train"]["gpu"] = True
    path = tmp_path / "gpu.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CalodistillError, match=r"gpu\.yaml: stage\(s\) train have gpu: true but no CUDA device"):
        run_pipeline(path, run_root=tmp_path / "runs", track=False)
    assert not log.exists()
