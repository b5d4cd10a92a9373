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
