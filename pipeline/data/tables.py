"""CSV and Parquet shower tables: chunked readers, the calodistill Arrow layout and the writers.

A table has declared columns (:class:`~.columns.ColumnSpec`; ``--columns key=value,...`` or
``--columns FILE.yaml`` on the command line, which also declares units and encodings). The default
convention, every key of which can be overridden:

======================  =========================================================================
``incident_energy``     incident energy per shower (``energy_unit``: ``MeV`` by default, or ``GeV``)
``voxels``              either one list column named ``voxels`` (Parquet list / fixed-size list),
                        or scalar columns ``v0 .. v{D-1}`` (a prefix pattern ``v*``, ordered by the
                        number after the prefix); MeV
``particle``            optional string column; otherwise the geometry's particle
``event_id``            optional integer column; otherwise the row number
======================  =========================================================================

Extra columns are ignored, so a Parquet file written by :func:`write_parquet` (or a part of an ingested
dataset) reads back as a table. CSV files get a row → byte-offset index on open (one pass over the
file), so every chunk is parsed from its own byte range, as ``dask.dataframe.read_csv`` does.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalodistillError
from .columns import ColumnSpec
from .geometry import Geometry, infer_geometry
from .showers import Showers
from .source import Source, one_line

__all__ = [
    "PARQUET_METADATA_KEY",
    "ColumnSpec",
    "CsvSource",
    "ParquetSource",
    "list_column_to_numpy",
    "open_csv",
    "open_parquet",
    "showers_to_table",
    "write_csv",
    "write_parquet",
]

PARQUET_METADATA_KEY = b"calodistill"
_CSV_INDEX_STRIDE = 4096  # rows between two entries of a CSV file's byte-offset index


def _non_numeric_cell(path: str, frame: Any, start: int, names: list[str]) -> str | None:
    """The message naming the first cell of ``names`` that is not a number (column, row, value), or None."""
    import pandas as pd

    for name in names:
        column = frame[name]
        bad = (pd.to_numeric(column, errors="coerce").isna() & column.notna()).to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            return f"{path}: column {name!r}, row {start + i}: {str(column.iloc[i])[:40]!r} is not a number"
    return None


def _frame_to_showers(src: Source, frame: Any, start: int, cols: ColumnSpec, voxel_names: list[str]) -> Showers:
    """A pandas DataFrame (CSV chunk) → validated Showers."""
    import pandas as pd

    path = src.path
    try:
        incident = pd.to_numeric(frame[cols.incident_energy], errors="raise").to_numpy(np.float64)
        voxels = frame[voxel_names].apply(pd.to_numeric, errors="raise").to_numpy(
            np.float32 if cols.voxel_encoding == "linear" and cols.voxel_unit == "MeV" else np.float64)
    except (ValueError, TypeError) as exc:
        raise CalodistillError(_non_numeric_cell(path, frame, start, [cols.incident_energy, *voxel_names])
                               or f"{path}: non-numeric value in rows {start}..{start + len(frame) - 1}: {one_line(exc)}") from None
    incident = cols.incident_to_mev(incident, path, start)
    voxels = cols.voxels_to_mev(voxels, path, start)
    particle = None
    if cols.particle in frame:
        raw = frame[cols.particle]
        particle = (cols.particles(raw.to_numpy(), path, start) if cols.particle_codes
                    else raw.astype(str).to_numpy(object))
    event_id = None
    if cols.event_id in frame:
        event_id = pd.to_numeric(frame[cols.event_id], errors="coerce").to_numpy()
        if np.isnan(event_id.astype(np.float64)).any():
            raise CalodistillError(f"{path}: column {cols.event_id!r} holds a non-integer value")
        event_id = event_id.astype(np.int64)
    return src._validated(start, incident, voxels, particle, event_id, energy_unit=cols.energy_unit)


@dataclass
class CsvSource(Source):
    """A CSV table (see :class:`ColumnSpec`); read by byte range from a row → offset index."""

    columns: ColumnSpec = field(default_factory=ColumnSpec)
    header: list[str] = field(default_factory=list)
    voxel_names: list[str] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # byte offset of rows 0, S, 2S, ... and of the end
    stride: int = _CSV_INDEX_STRIDE

    def _read(self, start: int, stop: int) -> Showers:
        import pandas as pd

        k = start // self.stride
        skip = start - k * self.stride
        k_end = -(-stop // self.stride)
        end = self.offsets[min(k_end, len(self.offsets) - 1)]
        with open(self.path, "rb") as fh:
            fh.seek(self.offsets[k])
            data = fh.read(end - self.offsets[k])
        try:
            frame = pd.read_csv(
                io.BytesIO(data), header=None, names=self.header, skiprows=skip, nrows=stop - start,
                dtype={self.columns.particle: str} if self.columns.particle in self.header
                and not self.columns.particle_codes else None,
            )
        except (ValueError, pd.errors.ParserError) as exc:
            raise CalodistillError(f"{self.path}: malformed CSV in rows {start}..{stop - 1}: {one_line(exc)}") from None
        if len(frame) != stop - start:
            raise CalodistillError(f"{self.path}: expected {stop - start} rows from row {start}, read {len(frame)}")
        if frame.isna().to_numpy().any():
            bad = frame.isna().any(axis=1).to_numpy()
            raise CalodistillError(f"{self.path}: missing or NaN value in row {start + int(np.argmax(bad))}")
        return _frame_to_showers(self, frame, start, self.columns, self.voxel_names)


def open_csv(path: str, geometry: Geometry | None, cols: ColumnSpec) -> Source:
    """Open a CSV table: index its row offsets, resolve the columns and the geometry."""
    import pandas as pd

    stride = _CSV_INDEX_STRIDE
    with open(path, "rb") as fh:
        header_line = fh.readline()
        if not header_line.strip():
            raise CalodistillError(f"{path}: empty file (no header line)")
        offsets = [fh.tell()]
        n = 0
        pos = fh.tell()
        for line in fh:
            pos += len(line)
            if not line.strip():
                continue
            n += 1
            if n % stride == 0:
                offsets.append(pos)
        offsets.append(pos)
    try:
        header = list(pd.read_csv(io.BytesIO(header_line), nrows=0).columns)
    except (ValueError, pd.errors.ParserError) as exc:
        raise CalodistillError(f"{path}: unreadable CSV header: {one_line(exc)}") from None
    if cols.incident_energy not in header:
        raise CalodistillError(f"{path}: missing column {cols.incident_energy!r} (incident energy)")
    kind, voxel_names = cols.voxel_columns(header, path)
    if kind != "scalar":
        raise CalodistillError(f"{path}: a CSV file needs one column per voxel (e.g. v0..v503), not a list column")
    geo = geometry or infer_geometry(len(voxel_names), path)
    if len(voxel_names) != geo.n_voxels:
        raise CalodistillError(f"{path}: {len(voxel_names)} voxel columns, geometry {geo.name} has {geo.n_voxels}")
    if n == 0:
        raise CalodistillError(f"{path}: empty file (no showers)")
    return CsvSource(path, geo, n, "csv", columns=cols, header=header, voxel_names=voxel_names, offsets=offsets, stride=stride)


@dataclass
class ParquetSource(Source):
    """A single Parquet file (see :class:`ColumnSpec`); read by row groups."""

    columns: ColumnSpec = field(default_factory=ColumnSpec)
    voxel_kind: str = "list"
    voxel_names: list[str] = field(default_factory=list)
    row_group_starts: list[int] = field(default_factory=list)

    def _read(self, start: int, stop: int) -> Showers:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = self.columns
        try:
            pf = pq.ParquetFile(self.path)
            names = pf.schema_arrow.names
            wanted = [cols.incident_energy, *self.voxel_names] + [c for c in (cols.particle, cols.event_id) if c in names]
            starts = self.row_group_starts
            groups = [i for i in range(len(starts) - 1) if starts[i] < stop and starts[i + 1] > start]
            table = pf.read_row_groups(groups, columns=wanted) if groups else pf.schema_arrow.empty_table()
        except (OSError, pa.ArrowException) as exc:
            raise CalodistillError(f"{self.path}: cannot read Parquet rows {start}..{stop - 1}: {one_line(exc)}") from None
        table = table.slice(start - (starts[groups[0]] if groups else 0), stop - start)
        incident = _column_numpy(self.path, table.column(cols.incident_energy), np.float64, cols.incident_energy)
        incident = cols.incident_to_mev(incident, self.path, start)
        if self.voxel_kind == "list":
            voxels = list_column_to_numpy(table.column(self.voxel_names[0]), self.geometry.n_voxels, self.path,
                                          np.float32 if cols.voxel_encoding == "linear" and cols.voxel_unit == "MeV"
                                          else np.float64)
        else:
            voxels = np.empty((table.num_rows, len(self.voxel_names)), dtype=np.float32)
            for j, name in enumerate(self.voxel_names):
                voxels[:, j] = _column_numpy(self.path, table.column(name), np.float32, name)
        voxels = cols.voxels_to_mev(voxels, self.path, start)
        particle = None
        if cols.particle in table.column_names:
            column = table.column(cols.particle)
            if cols.particle_codes and not pa.types.is_dictionary(column.type) and not pa.types.is_string(column.type):
                particle = cols.particles(_column_numpy(self.path, column, np.int64, cols.particle), self.path, start)
            else:
                particle = np.asarray(column.cast(pa.string()).to_pylist(), dtype=object)
        event_id = None
        if cols.event_id in table.column_names:
            event_id = _column_numpy(self.path, table.column(cols.event_id), np.int64, cols.event_id)
        return self._validated(start, incident, voxels, particle, event_id, energy_unit=cols.energy_unit)


def _column_numpy(path: str, column: Any, dtype: Any, name: str) -> np.ndarray:
    import pyarrow as pa

    if column.null_count:
        raise CalodistillError(f"{path}: column {name!r} has {column.null_count} missing value(s)")
    try:
        return column.to_numpy().astype(dtype, copy=False)
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise CalodistillError(f"{path}: column {name!r} is not numeric: {one_line(exc)}") from None


def list_column_to_numpy(column: Any, width: int, path: str = "parquet", dtype: Any = np.float32) -> np.ndarray:
    """A (chunked) list / fixed-size-list column of floats → ``(N, width)`` ``dtype``, without Python loops."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = np.empty((sum(len(c) for c in chunks), width), dtype=dtype)
    row = 0
    for chunk in chunks:
        n = len(chunk)
        if n == 0:
            continue
        if chunk.null_count:
            raise CalodistillError(f"{path}: voxel list column has {chunk.null_count} missing row(s)")
        if pa.types.is_fixed_size_list(chunk.type):
            if chunk.type.list_size != width:
                raise CalodistillError(f"{path}: {chunk.type.list_size} voxels per shower, expected {width}")
        elif pa.types.is_list(chunk.type) or pa.types.is_large_list(chunk.type):
            lengths = np.diff(np.asarray(chunk.offsets))
            if (lengths != width).any():
                bad = int(np.argmax(lengths != width))
                raise CalodistillError(f"{path}: row {row + bad} has {lengths[bad]} voxels, expected {width}")
        else:
            raise CalodistillError(f"{path}: voxel column of type {chunk.type} is not a list of numbers")
        values = chunk.flatten()
        if values.null_count:
            raise CalodistillError(f"{path}: voxel values contain {values.null_count} missing value(s)")
        try:
            flat = values.to_numpy(zero_copy_only=False)
        except (pa.ArrowException, ValueError) as exc:
            raise CalodistillError(f"{path}: voxel values are not numeric: {one_line(exc)}") from None
        out[row : row + n] = flat.reshape(n, width)
        row += n
    return out


def _parquet_geometry_hint(schema: Any) -> dict[str, Any] | None:
    """The geometry record in a calodistill Parquet file's schema metadata, if any."""
    meta = schema.metadata or {}
    if PARQUET_METADATA_KEY in meta:
        try:
            record = json.loads(meta[PARQUET_METADATA_KEY])["geometry"]
        except (ValueError, KeyError, TypeError):
            return None
        return record if isinstance(record, dict) else None
    return None


def open_parquet(path: str, geometry: Geometry | None, cols: ColumnSpec) -> Source:
    """Open one Parquet file: resolve the columns, the voxel width and the geometry (schema metadata first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise CalodistillError(f"{path}: not a readable Parquet file (truncated or corrupt): {one_line(exc)}") from None
    schema = pf.schema_arrow
    names = schema.names
    if cols.incident_energy not in names:
        raise CalodistillError(f"{path}: missing column {cols.incident_energy!r} (incident energy)")
    kind, voxel_names = cols.voxel_columns(names, path)
    if kind == "list":
        typ = schema.field(voxel_names[0]).type
        if pa.types.is_fixed_size_list(typ):
            width = typ.list_size
        elif pa.types.is_list(typ) or pa.types.is_large_list(typ):
            width = None
        else:
            raise CalodistillError(f"{path}: column {voxel_names[0]!r} of type {typ} is not a list of voxel energies")
    else:
        width = len(voxel_names)
    n = pf.metadata.num_rows
    if geometry is None:
        hint = _parquet_geometry_hint(schema)
        if hint is not None:
            geometry = Geometry.from_dict(hint, path)
    if width is None:
        if geometry is None:
            if n == 0:
                raise CalodistillError(f"{path}: empty file (no showers)")
            first = pf.read_row_group(0, columns=voxel_names).column(0)
            width = len(first[0].values) if len(first) else 0
        else:
            width = geometry.n_voxels
    geo = geometry or infer_geometry(width, path)
    if width != geo.n_voxels:
        raise CalodistillError(f"{path}: {width} voxels per shower, geometry {geo.name} has {geo.n_voxels}")
    if n == 0:
        raise CalodistillError(f"{path}: empty file (no showers)")
    sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
    starts = [0, *np.cumsum(sizes).tolist()]
    chunk = max(1, int(np.median(sizes))) if sizes else 1
    return ParquetSource(
        path, geo, n, "parquet", chunk_rows=chunk, columns=cols, voxel_kind=kind, voxel_names=voxel_names,
        row_group_starts=[int(s) for s in starts],
    )


def showers_to_table(showers: Showers, split: np.ndarray | None = None, metadata: dict | None = None) -> Any:
    """The Arrow table of the calodistill Parquet layout (the layout of ingested datasets, docs/data.md).

    Columns: ``event_id`` int64, ``incident_energy`` float64 MeV, ``particle`` dictionary<string>,
    [``split`` int8,] ``layer_energies`` fixed_size_list<float32>[L], ``voxels`` fixed_size_list<float32>[D].
    Built without copying the voxels (a contiguous float32 buffer wrapped as a fixed-size list).
    """
    import pyarrow as pa

    geo = showers.geometry
    voxels = np.ascontiguousarray(showers.voxels, dtype=np.float32)
    layer_e = np.ascontiguousarray(geo.layer_energies(voxels).astype(np.float32))
    particles = pa.array(showers.particle.astype(str), type=pa.string()).dictionary_encode()
    arrays = [
        pa.array(showers.event_id, type=pa.int64()),
        pa.array(showers.incident_energy, type=pa.float64()),
        particles,
    ]
    names = ["event_id", "incident_energy", "particle"]
    if split is not None:
        arrays.append(pa.array(np.asarray(split, dtype=np.int8), type=pa.int8()))
        names.append("split")
    arrays += [
        pa.FixedSizeListArray.from_arrays(pa.array(layer_e.reshape(-1)), geo.n_layers),
        pa.FixedSizeListArray.from_arrays(pa.array(voxels.reshape(-1)), geo.n_voxels),
    ]
    names += ["layer_energies", "voxels"]
    table = pa.Table.from_arrays(arrays, names=names)
    if metadata is not None:
        table = table.replace_schema_metadata({PARQUET_METADATA_KEY: json.dumps(metadata).encode()})
    return table


def write_parquet(showers: Showers, path: Path) -> None:
    """One Parquet file in the calodistill layout, the geometry in the schema metadata (zstd; not atomic)."""
    import pyarrow.parquet as pq

    meta = {"geometry": showers.geometry.to_dict(), "units": "MeV"}
    pq.write_table(showers_to_table(showers, metadata=meta), path, compression="zstd")


def write_csv(showers: Showers, path: Path) -> None:
    """A CSV table ``event_id, incident_energy, particle, v0..v{D-1}`` (not atomic)."""
    import pandas as pd

    frame = pd.DataFrame(showers.voxels, columns=[f"v{i}" for i in range(showers.geometry.n_voxels)])
    frame.insert(0, "particle", showers.particle)
    frame.insert(0, "incident_energy", showers.incident_energy)
    frame.insert(0, "event_id", showers.event_id)
    frame.to_csv(path, index=False)
