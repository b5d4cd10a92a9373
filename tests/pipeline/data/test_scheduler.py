"""Where data tasks run (pipeline/data/scheduler.py): the default is a real LocalCluster, closed afterwards."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from calodistill.pipeline.data.dataset import open_dataset
from calodistill.pipeline.data.formats import read_showers
from calodistill.pipeline.data.ingest import ingest_showers


def test_default_scheduler_is_a_local_cluster(calogan_real_file: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """scheduler=None starts (and closes) a real LocalCluster of worker processes, and leaves nothing in
    TMPDIR (Dask's default scratch space, ``dask-scratch-space/``, would stay there)."""
    import distributed

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    summary = ingest_showers([calogan_real_file], tmp_path / "ds", progress=False, partition_mb=0.03)
    assert summary["n_partitions"] == 4  # 0.03 MB / 2024 B per row = 14 rows per file
    np.testing.assert_array_equal(open_dataset(tmp_path / "ds").load().voxels, read_showers(calogan_real_file).voxels)
    with pytest.raises(ValueError):
        distributed.get_client()  # the cluster's client was closed
    assert sorted(os.listdir(tmpdir)) == []


def test_scratch_dirs_of_dead_processes_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from calodistill.pipeline.data.scheduler import (
        _host,
        make_scratch_dir,
        remove_scratch_dir,
    )

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    (tmp_path / f"calodistill-dask-{_host()}-{dead}-abc" / "dask-scratch-space").mkdir(parents=True)
    live = tmp_path / f"calodistill-dask-{_host()}-{os.getppid()}-abc"
    other_host = tmp_path / f"calodistill-dask-otherhost-{dead}-abc"
    live.mkdir()
    other_host.mkdir()
    scratch = make_scratch_dir()
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other_host.name, scratch.name])
    remove_scratch_dir(scratch)
    assert not scratch.exists()


def test_expected_error_on_a_worker_has_no_dask_traceback(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A validation error found on a LocalCluster worker reaches the caller as one line; the worker does not
    log Dask's "Compute Failed ... Traceback" block for it on the terminal, nor does the cluster's start
    show on it (an INFO line before the error)."""
    import pandas as pd

    from calodistill.pipeline.errors import CalodistillError

    caplog.set_level(logging.DEBUG, logger="calodistill.pipeline.data.scheduler")
    frame = pd.DataFrame({"incident_energy": [10.0, -5.0]})
    frame = pd.concat([frame, pd.DataFrame(np.ones((2, 504)), columns=[f"v{i}" for i in range(504)])], axis=1)
    frame.to_csv(tmp_path / "neg.csv", index=False)
    with pytest.raises(CalodistillError, match=r"neg.csv: non-positive incident energy -5 MeV in row 1"):
        ingest_showers([tmp_path / "neg.csv"], tmp_path / "ds", progress=False)
    err = capfd.readouterr().err
    assert "Compute Failed" not in err and "Traceback" not in err, err
    started = [r for r in caplog.records if "starting a Dask LocalCluster" in r.getMessage()]
    assert [r.levelno for r in started] == [logging.DEBUG]
