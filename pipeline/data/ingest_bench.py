"""Benchmark of the Dask ingest against a plain single-threaded ``pyarrow.parquet.write_table``."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from .formats import read_showers, write_showers
from .geometry import get_geometry
from .ingest import ingest_showers, split_assignment
from .scheduler import LOCAL_SCHEDULERS
from .showers import Showers
from .synth import SynthSpec, generate_showers
from .tables import showers_to_table

__all__ = ["bench_ingest"]


def bench_ingest(
    n: int = 20000,
    geometry: str = "calogan",
    scheduler: str | None = None,
    workdir: str | os.PathLike[str] | None = None,
    showers: Showers | None = None,
    seed: int = 0,
    partition_mb: float = 100.0,
) -> dict[str, float | str | int]:
    """Time :func:`ingest_showers` of an HDF5 file against a plain ``pyarrow.parquet.write_table``.

    The showers (synthetic, unless given) are first written to a native-layout HDF5 file (not timed).
    Baseline: ``read_showers`` of that file + building the same Arrow table + one ``write_table`` (zstd),
    all in one thread. Ingest: the full Dask ingest of the file (validation, split, partitions, sha256,
    metadata); the cluster start-up (and the workers' first imports) is timed separately
    (``cluster_start_s``) and not counted. ``partition_mb`` is the ingest's (100 MB by default: a
    benchmark smaller than that is one partition, i.e. one worker; pass less to spread it out).

    Returns:
        ``ingest_showers_per_s``, ``ingest_mb_per_s``, ``baseline_showers_per_s``, ``baseline_mb_per_s``,
        ``ratio`` (ingest rate / baseline rate), ``write_table_only_s`` and the set-up, MB = uncompressed
        voxel + incident-energy bytes.
    """
    import pyarrow.parquet as pq

    if showers is None:
        showers = generate_showers(SynthSpec(geometry=geometry, n=n, seed=seed))
    n = len(showers)
    geo = showers.geometry
    raw_mb = n * (4 * geo.n_voxels + 8) / 1e6
    with tempfile.TemporaryDirectory(dir=workdir, prefix="calodistill-bench-") as d:
        src = Path(d) / "showers.h5"
        write_showers(showers, src)

        _warm_imports()
        t = time.perf_counter()
        table = showers_to_table(showers, split=split_assignment(showers.event_id, seed))
        pq.write_table(table, Path(d) / "plain0.parquet", compression="zstd")
        write_only = time.perf_counter() - t

        t = time.perf_counter()
        sh = read_showers(src)
        table = showers_to_table(sh, split=split_assignment(sh.event_id, seed))
        pq.write_table(table, Path(d) / "plain.parquet", compression="zstd")
        baseline = time.perf_counter() - t

        cluster_start = 0.0
        n_workers = 1
        cluster = client = None
        address = scheduler
        try:
            if scheduler is None:
                from distributed import Client, LocalCluster

                t = time.perf_counter()
                n_workers = max(1, min(8, os.cpu_count() or 1))
                cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=None,
                                       silence_logs=logging.ERROR)
                client = Client(cluster)
                client.run(_warm_imports)
                cluster_start = time.perf_counter() - t
                address = cluster.scheduler_address
            elif scheduler not in LOCAL_SCHEDULERS:
                from distributed import Client

                with Client(scheduler) as c:
                    n_workers = max(1, len(c.scheduler_info().get("workers", {})))
                    c.run(_warm_imports)
            t = time.perf_counter()
            summary = ingest_showers([src], Path(d) / "dataset", scheduler=address, progress=False,
                                     partition_mb=partition_mb)
            ingest_s = time.perf_counter() - t
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
    return {
        "geometry": geo.name,
        "n": n,
        "partition_mb": float(partition_mb),
        "n_partitions": int(summary["n_partitions"]),
        "n_voxels": geo.n_voxels,
        "raw_mb": raw_mb,
        "n_workers": n_workers,
        "cluster_start_s": cluster_start,
        "ingest_s": ingest_s,
        "ingest_showers_per_s": n / ingest_s,
        "ingest_mb_per_s": raw_mb / ingest_s,
        "dataset_bytes": int(summary["bytes"]),
        "baseline_s": baseline,
        "baseline_showers_per_s": n / baseline,
        "baseline_mb_per_s": raw_mb / baseline,
        "write_table_only_s": write_only,
        "ratio": baseline / ingest_s,
    }


def _warm_imports() -> None:
    """Import and initialise what ingest tasks need (run on every worker before timing).

    The first Arrow table built in a process pays a one-off kernel initialisation (``dictionary_encode``,
    docs/experiments.md); a one-row write here keeps it out of the measured ingest.
    """
    import h5py  # noqa: F401
    import pyarrow as pa
    import pyarrow.parquet as pq

    geo = get_geometry("calogan")
    one = Showers(geo, np.ones(1), np.zeros((1, geo.n_voxels), np.float32))
    pq.write_table(showers_to_table(one, split=np.zeros(1, np.int8)), pa.BufferOutputStream(), compression="zstd")
