"""``calodistill ingest``: shower files and synthetic sources → one partitioned, validated Parquet dataset.

How it runs
    Every source is opened on the driver (:func:`pipeline.formats.open_source`: format, geometry, row
    count and a first validation of keys and shapes — bad files fail here, before any work). The rows are
    then cut into partitions of about ``partition_mb`` MB (uncompressed) and each partition becomes one
    Dask task that reads its row range (h5py hyperslab, CSV byte range, Parquet row groups, or a chunk of
    the synthetic generator), validates it, assigns event ids and the split, and writes one Parquet file.
    No shower data travels through the scheduler — tasks return a few numbers — so the ingest scales with
    the number of workers. A task per file computes its SHA-256 alongside. Everything is written into a
    temporary directory beside ``out_dir`` which is renamed into place only when all tasks have succeeded;
    on any error it is removed, so a failed ingest leaves nothing behind.

    Scheduler: a ``distributed.LocalCluster`` by default (worker processes, one thread each, no dashboard;
    closed afterwards); ``scheduler="tcp://HOST:8786"`` uses an existing cluster (workers must see the
    source files and ``out_dir`` on a shared file system); ``scheduler="threads"`` or ``"synchronous"``
    runs in-process on Dask's local schedulers (no cluster start-up: tests, notebooks, small inputs).

Layout (one row per shower)
    ====================  ==================================  =============================================
    ``event_id``          int64                               unique in the dataset (source offset + row)
    ``incident_energy``   float64, MeV
    ``particle``          dictionary<int32, string>           a few distinct values → a few bytes per row
    ``split``             int8                                0 train, 1 val, 2 test
    ``layer_energies``    fixed_size_list<float32>[L]         sum of the layer's voxels, MeV
    ``voxels``            fixed_size_list<float32>[D]         MeV, in the geometry's voxel order
    ====================  ==================================  =============================================

    Why a fixed-size list for the voxels rather than one column per voxel: a fixed-size list is stored
    as one column whose values are a single contiguous float32 buffer (no offsets), so writing is a
    zero-copy wrap of the ``(N, D)`` numpy array and reading is ``values.reshape(N, D)`` — the cost per
    byte is the same for D = 368, 504, 6480 or 40500. With one column per voxel, dataset 2 would need
    6480 column chunks per row group, each with its own page headers, statistics and footer entries
    (the footer alone grows to megabytes and must be parsed on every open), Arrow would assemble 6480
    arrays per batch, and the compressor would see 6480 tiny streams instead of one long one.

    Within each file rows are grouped by split, each split in its own row groups, so ``split == k``
    filters skip whole row groups from their min/max statistics (``pipeline.dataset`` reads only the
    split it is asked for). zstd compression; ~16 MB row groups; partitions of ``partition_mb``
    uncompressed MB (zero-heavy showers compress several-fold on disk).

Split
    Deterministic per event: a SplitMix64 hash of ``(split_seed, event_id)`` mapped to [0, 1) and cut at
    the cumulative ``split_fractions``. It does not depend on partitioning, chunk sizes or the scheduler,
    and adding sources never moves an existing event to another split.

Metadata
    ``_calodistill.json`` in the dataset directory (geometry, units "MeV", sources with sha256 and
    counts, split seed and fractions, counts per split, files with size and sha256, calodistill version,
    creation time); the same JSON in the Parquet schema metadata (key ``calodistill``) of
    ``_common_metadata``, and the per-file part of it (all but counts and file list) in every data file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import CalodistillError
from .formats import (
    PARQUET_METADATA_KEY,
    ColumnSpec,
    Source,
    open_source,
    resolve_geometry,
    showers_to_table,
)
from .geometry import Geometry, get_geometry
from .showers import Showers

__all__ = [
    "ingest_showers",
    "SPLITS",
    "split_assignment",
    "SynthSource",
    "open_any_source",
    "bench_ingest",
    "METADATA_FILE",
    "LAYOUT_VERSION",
]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
METADATA_FILE = "_calodistill.json"
COMMON_METADATA_FILE = "_common_metadata"
LAYOUT_VERSION = "calodistill-showers/1"
_ROW_GROUP_BYTES = 16 * 1024 * 1024


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("calodistill")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "0+unknown"


# --------------------------------------------------------------------------------------------- split
def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele, Lea & Flood 2014), vectorised on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_assignment(event_id: np.ndarray, seed: int, fractions: tuple[float, ...] = (0.8, 0.1, 0.1)) -> np.ndarray:
    """Split code per event (0 train, 1 val, 2 test): a hash of ``(seed, event_id)`` cut at the fractions.

    Deterministic, independent of how the events are chunked, and uniform: the expected share of each
    split is its fraction.
    """
    frac = np.asarray(fractions, dtype=np.float64)
    ids = np.asarray(event_id, dtype=np.int64).astype(np.uint64)
    seed_key = _splitmix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    u = (_splitmix64(ids ^ seed_key) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    cuts = np.cumsum(frac / frac.sum())[:-1]
    return np.searchsorted(cuts, u, side="right").astype(np.int8)


def _check_fractions(fractions: tuple[float, ...]) -> tuple[float, float, float]:
    frac = tuple(float(f) for f in fractions)
    if len(frac) != 3 or any(not np.isfinite(f) or f < 0 for f in frac) or abs(sum(frac) - 1.0) > 1e-6:
        raise CalodistillError(f"split fractions: expected three non-negative numbers summing to 1, got {fractions}")
    return frac  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------- synth
@dataclass
class SynthSource(Source):
    """A ``synth:GEOMETRY?n=N&seed=S&...`` source: chunks of :func:`pipeline.synth.generate_chunk`."""

    spec: Any = None
    spec_text: str = ""

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical source string (a synthetic source is defined by its parameters)."""
        return hashlib.sha256(self.spec_text.encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["spec"] = dataclasses.asdict(self.spec) if dataclasses.is_dataclass(self.spec) else dict(vars(self.spec))
        return out

    def _read(self, start: int, stop: int) -> Showers:
        from .synth import generate_chunk

        cs = int(self.spec.chunk_size)
        parts = []
        for i in range(start // cs, (stop - 1) // cs + 1 if stop > start else start // cs):
            chunk = generate_chunk(self.spec, i)
            lo = max(start - i * cs, 0)
            hi = min(stop - i * cs, len(chunk))
            parts.append(chunk.subset(slice(lo, hi)))
        if not parts:
            return Showers(self.geometry, np.zeros(0), np.zeros((0, self.geometry.n_voxels), np.float32))
        out = Showers.concatenate(parts) if len(parts) > 1 else parts[0]
        out.event_id = np.arange(start, stop, dtype=np.int64)
        return out


def _open_synth(text: str, geometry: Geometry | None) -> SynthSource:
    try:
        from .synth import parse_synth_source
    except ImportError as exc:
        raise CalodistillError(f"{text}: synthetic sources need pipeline.synth ({exc})") from None
    spec = parse_synth_source(text)
    geo = get_geometry(spec.geometry)
    if geometry is not None and geometry.name != geo.name:
        raise CalodistillError(f"{text}: synthetic geometry {geo.name} differs from --geometry {geometry.name}")
    if int(spec.n) <= 0:
        raise CalodistillError(f"{text}: n must be positive")
    fields = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else dict(vars(spec))
    canonical = json.dumps(fields, sort_keys=True, default=str)
    return SynthSource(text, geo, int(spec.n), "synth", chunk_rows=int(spec.chunk_size), spec=spec, spec_text=canonical)


def open_any_source(
    text: str | os.PathLike[str], geometry: str | Geometry | None = None, columns: str | dict | ColumnSpec | None = None
) -> Source:
    """A file path (:func:`pipeline.formats.open_source`) or a ``synth:...`` string."""
    s = str(text)
    if s.startswith("synth:"):
        geo = None
        if geometry is not None:
            geo = resolve_geometry(geometry, s)
        return _open_synth(s, geo)
    return open_source(s, geometry, columns)


# --------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class _Partition:
    index: int
    source_index: int
    start: int
    stop: int
    id_offset: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}.parquet"


def _plan(sources: list[Source], partition_mb: float) -> list[_Partition]:
    parts: list[_Partition] = []
    offset = 0
    for k, src in enumerate(sources):
        # whole HDF5 chunks / Parquet row groups per partition when partitions are larger than them;
        # synthetic partitions are always whole generator chunks (a chunk is generated as a unit)
        align = max(1, int(src.chunk_rows))
        rows = max(1, int(partition_mb * 1e6 // src.bytes_per_row))
        if rows >= align or src.kind == "synth":
            rows = max(align, rows // align * align)
        for start in range(0, src.n_rows, rows):
            parts.append(_Partition(len(parts), k, start, min(start + rows, src.n_rows), offset))
        offset += src.n_rows
    return parts


def _write_partition(
    source: Source,
    part: _Partition,
    out_dir: str,
    split_seed: int,
    fractions: tuple[float, float, float],
    file_metadata: str,
) -> dict[str, Any]:
    """One Dask task: read, validate, split and write rows ``part.start:part.stop`` of one source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    showers = source.read(part.start, part.stop)
    n = len(showers)
    event_id = part.id_offset + np.arange(part.start, part.stop, dtype=np.int64)
    split = split_assignment(event_id, split_seed, fractions)
    order = np.argsort(split, kind="stable")
    showers = Showers(
        showers.geometry, showers.incident_energy[order], showers.voxels[order], showers.particle[order], event_id[order]
    )
    split = split[order]
    table = showers_to_table(showers, split=split)
    table = table.replace_schema_metadata({PARQUET_METADATA_KEY: file_metadata.encode()})
    counts = np.bincount(split, minlength=len(SPLITS)).astype(int).tolist()
    row_group = max(1, _ROW_GROUP_BYTES // source.bytes_per_row)
    sink = pa.BufferOutputStream()
    # zstd at its default level; dictionary encoding and min/max statistics only where they pay off
    # (voxel floats gain nothing from a dictionary; ``split`` statistics let split filters skip row groups)
    with pq.ParquetWriter(
        sink, table.schema, compression="zstd", use_dictionary=["particle"],
        write_statistics=["event_id", "incident_energy", "particle", "split"],
    ) as writer:
        start = 0
        for c in counts:  # one run of row groups per split, so split filters skip row groups
            if c:
                writer.write_table(table.slice(start, c), row_group_size=row_group)
            start += c
    buf = sink.getvalue()
    target = Path(out_dir) / part.name
    with open(target, "wb") as fh:
        fh.write(memoryview(buf))
    return {
        "_task": "partition",
        "name": part.name,
        "source": part.source_index,
        "rows": n,
        "bytes": buf.size,
        "sha256": hashlib.sha256(memoryview(buf)).hexdigest(),
        "counts": counts,
    }


def _describe_source(source: Source, index: int) -> dict[str, Any]:
    """One Dask task: the source's description with its SHA-256."""
    return {"_task": "source", "_index": index, **source.describe()}


# --------------------------------------------------------------------------------------------- running
class _Runner:
    """Runs a list of delayed tasks on the chosen scheduler and calls ``on_result`` as each finishes."""

    def __init__(self, scheduler: str | None) -> None:
        self.scheduler = scheduler
        self.cluster: Any = None
        self.client: Any = None

    def __enter__(self) -> "_Runner":
        if self.scheduler in ("threads", "synchronous", "sync", "single-threaded"):
            return self
        from distributed import Client, LocalCluster

        if self.scheduler is None or self.scheduler == "local":
            n_workers = max(1, min(8, os.cpu_count() or 1))
            logger.info("starting a Dask LocalCluster (%d worker processes)", n_workers)
            self._quiet_distributed()
            with warnings.catch_warnings():  # "Port 8787 is already in use" (its HTTP server moves on)
                warnings.filterwarnings("ignore", message="Port .* is already in use")
                self.cluster = LocalCluster(
                    n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
            self.client = Client(self.cluster)
        else:
            try:
                self.client = Client(self.scheduler, timeout="10s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise CalodistillError(f"scheduler {self.scheduler}: cannot connect: {' '.join(str(exc).split())}") from None
        return self

    def _quiet_distributed(self) -> None:
        """Keep the scheduler's and nannies' INFO chatter off the terminal while our cluster lives."""
        self._levels: dict[str, int] = {}
        for name in ["distributed", *logging.root.manager.loggerDict]:
            if name.startswith("distributed"):
                log = logging.getLogger(name)
                if log.level <= logging.INFO:
                    self._levels[name] = log.level
                    log.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        try:
            if self.client is not None:
                self.client.close()
            if self.cluster is not None:
                self.cluster.close()
        finally:
            for name, level in getattr(self, "_levels", {}).items():
                logging.getLogger(name).setLevel(level)

    def run(self, tasks: list[Any], on_result: Callable[[Any], None]) -> None:
        if self.client is None:
            import dask
            from dask.callbacks import Callback

            keys = {t.key for t in tasks}

            class _Progress(Callback):
                def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
                    if key in keys:
                        on_result(result)

            with _Progress():
                dask.compute(*tasks, scheduler=self.scheduler)
            return
        from distributed import as_completed

        futures = self.client.compute(tasks)
        try:
            for fut in as_completed(futures):
                on_result(fut.result())
        finally:
            self.client.cancel(futures)


# --------------------------------------------------------------------------------------------- ingest
def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not overwrite:
        raise CalodistillError(f"{out_dir}: dataset already exists; pass --overwrite (overwrite=True) to replace it")
    is_dataset = out_dir.is_dir() and (out_dir / METADATA_FILE).is_file()
    if not is_dataset and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise CalodistillError(f"{out_dir}: exists and is not a calodistill dataset; refusing to replace it")


def ingest_showers(
    sources: list[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    geometry: str | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    split_seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    partition_mb: float = 100.0,
    progress: bool = True,
    columns: str | dict[str, str] | ColumnSpec | None = None,
) -> dict[str, Any]:
    """Ingest shower sources into a partitioned Parquet dataset (layout and guarantees: module docstring).

    Args:
        sources: file paths (CaloGAN/CaloChallenge HDF5, CSV, Parquet) or ``synth:GEOMETRY?n=N&seed=S&...``.
        out_dir: the dataset directory to create.
        geometry: geometry name; ``None`` infers it per source (all sources must agree).
        scheduler: ``None`` (a fresh LocalCluster), ``"tcp://HOST:8786"`` (an existing cluster), or
            ``"threads"`` / ``"synchronous"`` (in-process).
        overwrite: replace an existing dataset (only a calodistill dataset or an empty directory).
        split_seed: seed of the train/val/test assignment.
        split_fractions: train, val, test fractions (sum 1).
        partition_mb: target uncompressed size of one Parquet file, MB.
        progress: show a tqdm bar (showers, rate, ETA) when on a terminal.
        columns: column declaration for CSV/Parquet sources (:class:`pipeline.formats.ColumnSpec`).

    Returns:
        Summary: ``out_dir``, ``geometry``, ``n_showers``, ``counts`` per split, ``sources`` (path, kind,
        sha256, n_rows, first_event_id), ``n_partitions``, ``bytes`` on disk, ``seconds``,
        ``showers_per_s``, ``mb_per_s`` (uncompressed MB/s), ``dataset_hash``.

    Raises:
        CalodistillError: a bad source (named in the message), mixed geometries, or a refused overwrite.
    """
    t0 = time.perf_counter()
    if not sources:
        raise CalodistillError("ingest: no sources given")
    out = Path(out_dir).expanduser().resolve()
    fractions = _check_fractions(split_fractions)
    if partition_mb <= 0:
        raise CalodistillError(f"partition_mb: must be positive, got {partition_mb}")
    _check_out_dir(out, overwrite)
    geo = resolve_geometry(geometry, "--geometry")
    opened = [open_any_source(s, geo, columns) for s in sources]
    names = {s.geometry.name for s in opened}
    if len(names) > 1:
        detail = ", ".join(f"{s.path} ({s.geometry.name})" for s in opened)
        raise CalodistillError(f"ingest: sources have different geometries: {detail}")
    geo = opened[0].geometry
    plan = _plan(opened, partition_mb)
    total = sum(s.n_rows for s in opened)

    file_meta = {
        "layout": LAYOUT_VERSION,
        "geometry": geo.to_dict(),
        "units": "MeV",
        "split_seed": int(split_seed),
        "split_fractions": list(fractions),
        "splits": {name: code for code, name in enumerate(SPLITS)},
        "calodistill_version": _version(),
    }
    file_meta_json = json.dumps(file_meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.ingest-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    results: list[dict[str, Any]] = []
    described: dict[int, dict[str, Any]] = {}
    try:
        import dask
        from tqdm.auto import tqdm

        tasks = [
            dask.delayed(_write_partition, pure=False)(
                opened[p.source_index], p, str(tmp), int(split_seed), fractions, file_meta_json,
                dask_key_name=f"calodistill-partition-{p.index}-{uuid.uuid4().hex[:6]}",
            )
            for p in plan
        ] + [
            dask.delayed(_describe_source, pure=False)(s, k, dask_key_name=f"calodistill-sha256-{k}-{uuid.uuid4().hex[:6]}")
            for k, s in enumerate(opened)
        ]
        with tqdm(total=total, unit="shower", unit_scale=True, desc=f"ingest {out.name}",
                  disable=None if progress else True, file=sys.stderr) as bar:

            def on_result(res: dict[str, Any]) -> None:
                if res["_task"] == "partition":
                    results.append(res)
                    bar.update(res["rows"])
                else:
                    described[res["_index"]] = res

            with _Runner(scheduler) as runner:
                runner.run(tasks, on_result)

        results.sort(key=lambda r: r["name"])
        counts = np.sum([r["counts"] for r in results], axis=0).astype(int).tolist()
        src_meta = []
        offset = 0
        for k, s in enumerate(opened):
            d = {key: v for key, v in described[k].items() if not key.startswith("_")}
            d["first_event_id"] = offset
            offset += s.n_rows
            src_meta.append(d)
        metadata = {
            **file_meta,
            "sources": src_meta,
            "counts": {**{name: counts[i] for i, name in enumerate(SPLITS)}, "total": int(total)},
            "files": [{"name": r["name"], "rows": r["rows"], "bytes": r["bytes"], "sha256": r["sha256"]} for r in results],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _write_metadata(tmp, metadata, results)
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    from .dataset import dataset_hash

    seconds = time.perf_counter() - t0
    raw_mb = total * opened[0].bytes_per_row / 1e6
    summary = {
        "out_dir": str(out),
        "geometry": geo.name,
        "n_showers": int(total),
        "counts": metadata["counts"],
        "sources": src_meta,
        "n_partitions": len(results),
        "bytes": int(sum(r["bytes"] for r in results)),
        "seconds": seconds,
        "showers_per_s": total / seconds,
        "mb_per_s": raw_mb / seconds,
        "dataset_hash": dataset_hash(out),
    }
    logger.info("ingested %d showers into %s in %.1f s", total, out, seconds)
    return summary


def _write_metadata(tmp: Path, metadata: dict[str, Any], results: list[dict[str, Any]]) -> None:
    import pyarrow.parquet as pq

    text = json.dumps(metadata, indent=1, sort_keys=True)
    schema = pq.read_schema(tmp / results[0]["name"]).with_metadata({PARQUET_METADATA_KEY: json.dumps(metadata).encode()})
    pq.write_metadata(schema, tmp / COMMON_METADATA_FILE)
    (tmp / METADATA_FILE).write_text(text + "\n")


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        try:
            os.rename(tmp, out)
            return
        except OSError as exc:
            if not out.exists():
                raise CalodistillError(f"{out}: cannot create dataset: {exc}") from None
    _check_out_dir(out, overwrite)  # someone created it meanwhile
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------- bench
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

    from .formats import read_showers, write_showers

    if showers is None:
        from .synth import SynthSpec, generate_showers

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
            elif scheduler not in ("threads", "synchronous", "sync", "single-threaded"):
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

    The first Arrow table built in a process pays ~1 s of one-off kernel initialisation
    (``dictionary_encode``); a one-row write here keeps that out of the measured ingest.
    """
    import h5py  # noqa: F401
    import pyarrow as pa
    import pyarrow.parquet as pq

    geo = get_geometry("calogan")
    one = Showers(geo, np.ones(1), np.zeros((1, geo.n_voxels), np.float32))
    pq.write_table(showers_to_table(one, split=np.zeros(1, np.int8)), pa.BufferOutputStream(), compression="zstd")


# --------------------------------------------------------------------------------------------- CLI
