"""Where data tasks run (pipeline/data/scheduler.py): the default is a real LocalCluster, closed afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calodistill.pipeline.data.dataset import open_dataset
from calodistill.pipeline.data.formats import read_showers
from calodistill.pipeline.data.ingest import ingest_showers


def test_default_scheduler_is_a_local_cluster(calogan_real_file: Path, tmp_path: Path) -> None:
    """scheduler=None starts (and closes) a real LocalCluster of worker processes."""
    import distributed

    summary = ingest_showers([calogan_real_file], tmp_path / "ds", progress=False, partition_mb=0.03)
    assert summary["n_partitions"] == 4  # 0.03 MB / 2024 B per row = 14 rows per file
    np.testing.assert_array_equal(open_dataset(tmp_path / "ds").load().voxels, read_showers(calogan_real_file).voxels)
    with pytest.raises(ValueError):
        distributed.get_client()  # the cluster's client was closed


def test_expected_error_on_a_worker_has_no_dask_traceback(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A validation error found on a LocalCluster worker reaches the caller as one line; the worker does not
    log Dask's "Compute Failed ... Traceback" block for it on the terminal."""
    import pandas as pd

    from calodistill.pipeline.errors import CalodistillError

    frame = pd.DataFrame({"incident_energy": [10.0, -5.0]})
    frame = pd.concat([frame, pd.DataFrame(np.ones((2, 504)), columns=[f"v{i}" for i in range(504)])], axis=1)
    frame.to_csv(tmp_path / "neg.csv", index=False)
    with pytest.raises(CalodistillError, match=r"neg.csv: non-positive incident energy -5 MeV in row 1"):
        ingest_showers([tmp_path / "neg.csv"], tmp_path / "ds", progress=False)
    err = capfd.readouterr().err
    assert "Compute Failed" not in err and "Traceback" not in err, err
