"""``calodistill ingest``: shower files and synthetic sources → one partitioned, validated Parquet dataset.

Every source is opened (and its keys and shapes checked) on the driver; its rows are cut into partitions
of about ``partition_mb`` uncompressed MB, and each partition is one Dask task that reads, validates,
splits and writes one Parquet file, returning only a few numbers. Everything is written into a
temporary directory that is renamed into place when all tasks have succeeded, so a failed ingest
leaves nothing behind. The layout, the split and the metadata are described in docs/data.md.
"""

from __future__ import annotations

import datetime as _dt
import glob
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_dir
from ..errors import CalodistillError
from .dataset import METADATA_FILE, SPLITS, dataset_hash
from .formats import open_source
from .columns import ColumnSpec
from .geometry import Geometry
from .root import split_root_path
from .scheduler import TaskScheduler
from .showers import Showers
from .source import Source, resolve_geometry
from .synth import open_synth_source
from .tables import PARQUET_METADATA_KEY, showers_to_table

__all__ = ["LAYOUT_VERSION", "expand_sources", "ingest_showers", "open_any_source", "split_assignment"]

logger = logging.getLogger(__name__)

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


def open_any_source(
    text: str | os.PathLike[str], geometry: str | Geometry | None = None, columns: str | dict | ColumnSpec | None = None
) -> Source:
    """A file path (:func:`~.formats.open_source`) or a ``synth:...`` string (:func:`~.synth.open_synth_source`)."""
    s = str(text)
    if s.startswith("synth:"):
        return open_synth_source(s, resolve_geometry(geometry, s))
    return open_source(s, geometry, columns)


def expand_sources(sources: list[str | os.PathLike[str]]) -> list[str]:
    """Expand glob patterns (``runs/*.root``, ``data/part-?.root:events``) into sorted file lists.

    ``synth:`` sources and paths that exist as they are pass through unchanged.
    """
    out: list[str] = []
    for source in sources:
        text = str(source)
        file, tree = split_root_path(text)
        if text.startswith("synth:") or not any(c in file for c in "*?[") or Path(file).exists():
            out.append(text)
            continue
        matches = sorted(glob.glob(os.path.expanduser(file)))
        if not matches:
            raise CalodistillError(f"{text}: no file matches the pattern")
        out.extend(f"{m}:{tree}" if tree else m for m in matches)
    return out


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


# -------------------------------------------------------------------------------------------- ingest
def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not overwrite:
        raise CalodistillError(f"{out_dir}: dataset already exists; pass --overwrite (overwrite=True) to replace it")
    is_dataset = out_dir.is_dir() and (out_dir / METADATA_FILE).is_file()
    if not is_dataset and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise CalodistillError(f"{out_dir}: exists and is not a calodistill dataset; refusing to replace it")


def _refuse_duplicate_sources(sources: list[Source]) -> None:
    """Refuse a source given twice: the same path, or the same bytes (SHA-256, computed only for files of
    equal size) — its showers would be ingested twice, into train and test alike."""
    seen: dict[str, str] = {}
    by_size: dict[int, list[Source]] = {}
    for src in sources:
        synthetic = str(src.path).startswith("synth:")
        key = str(src.path) if synthetic else os.path.realpath(src.path)
        if key in seen:
            raise CalodistillError(f"ingest: source {src.path} is given twice (also as {seen[key]}); its showers "
                                   "would be ingested twice")
        seen[key] = str(src.path)
        if not synthetic and os.path.isfile(src.path):
            by_size.setdefault(os.path.getsize(src.path), []).append(src)
    for same_size in by_size.values():
        digests: dict[str, str] = {}
        for src in same_size if len(same_size) > 1 else ():
            if src.sha256 in digests:
                raise CalodistillError(f"ingest: sources {digests[src.sha256]} and {src.path} have the same content "
                                       f"(sha256 {src.sha256[:12]}); its showers would be ingested twice")
            digests[src.sha256] = str(src.path)


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
    """Ingest shower sources into a partitioned Parquet dataset (layout and guarantees: docs/data.md).

    Args:
        sources: file paths or glob patterns (CaloGAN/CaloChallenge HDF5, ROOT ``file.root[:tree]``, CSV,
            Parquet, HDF5 through ``columns``) or ``synth:GEOMETRY?n=N&seed=S&...``.
        out_dir: the dataset directory to create.
        geometry: geometry name or geometry file (:mod:`.geometry_file`); ``None`` takes the one each source
            records or infers it (all sources must agree). It is stored in the dataset's metadata.
        scheduler: ``None`` (a fresh LocalCluster), ``"tcp://HOST:8786"`` (an existing cluster), or
            ``"threads"`` / ``"synchronous"`` (in-process).
        overwrite: replace an existing dataset (only a calodistill dataset or an empty directory).
        split_seed: seed of the train/val/test assignment.
        split_fractions: train, val, test fractions (sum 1).
        partition_mb: target uncompressed size of one Parquet file, MB.
        progress: show a tqdm bar (showers, rate, ETA) when on a terminal.
        columns: the column mapping of CSV/Parquet/ROOT/HDF5 sources (:class:`~.columns.ColumnSpec`: a
            mapping file, ``"key=value,..."`` or a dict).

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
    columns = ColumnSpec.parse(columns)
    opened = [open_any_source(s, geo, columns) for s in expand_sources(sources)]
    _refuse_duplicate_sources(opened)
    first = opened[0].geometry
    if any(s.geometry.name != first.name or not s.geometry.same_cells(first) for s in opened[1:]):
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
    results: list[dict[str, Any]] = []
    described: dict[int, dict[str, Any]] = {}
    with atomic_dir(out, "ingest") as tmp:
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

            with TaskScheduler(scheduler) as runner:
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
        _check_out_dir(out, overwrite)  # someone may have created it meanwhile

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
