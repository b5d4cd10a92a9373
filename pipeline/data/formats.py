"""Readers and writers of shower files: CaloGAN HDF5, CaloChallenge HDF5, CSV and Parquet tables.

Every reader returns :class:`pipeline.showers.Showers` in MeV and validates what it reads; anything wrong
raises :class:`pipeline.errors.CalodistillError` with a one-line message ``"<file>: <problem>"``.

Formats (``kind`` of a :class:`Source`):

- ``calogan`` (hep-lbdl/CaloGAN): ``energy`` (N, 1) or (N,) **GeV**; ``layer_0`` (N, 3, 96),
  ``layer_1`` (N, 12, 12), ``layer_2`` (N, 12, 6) MeV; ``overflow`` (N, 3) MeV (optional on read; its
  energy lies outside the cells and is not part of the voxels; written as zeros).
- ``calochallenge`` (Fast Calorimeter Simulation Challenge 2022): ``incident_energies`` (N, 1) or (N,)
  MeV; ``showers`` (N, D) MeV in the binning XML's voxel order. The geometry is given or inferred from D.
- ``table`` (CSV or Parquet) with declared columns. The default convention, which every key of
  ``columns`` (a :class:`ColumnSpec`, or ``--columns key=value,...`` on the command line) can override:

  ======================  =========================================================================
  ``incident_energy``     incident energy per shower (``energy_unit``: ``MeV`` by default, or ``GeV``)
  ``voxels``              either one list column named ``voxels`` (Parquet list / fixed-size list),
                          or scalar columns ``v0 .. v{D-1}`` (a prefix pattern ``v*``, ordered by the
                          number after the prefix); MeV
  ``particle``            optional string column; otherwise the geometry's particle
  ``event_id``            optional integer column; otherwise the row number
  ======================  =========================================================================

  Extra columns are ignored, so a Parquet file written by :func:`write_showers` (or a part of an ingested
  dataset) reads back as a table.

Chunked access (what the Dask ingest uses): :func:`open_source` returns a picklable :class:`Source` with
``.n_rows``, ``.geometry``, ``.read(start, stop) -> Showers`` and ``.sha256``. A source holds no open file
handle, so it can be shipped to Dask workers; each ``read`` opens the file, reads the row range and
validates it. CSV files get a row → byte-offset index on open (one pass over the file), so every chunk
is parsed from its own byte range, as ``dask.dataframe.read_csv`` does with a blocksize.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalodistillError
from .geometry import Geometry, get_geometry, infer_geometry
from .showers import Showers

__all__ = [
    "ColumnSpec",
    "Source",
    "Hdf5CaloGANSource",
    "Hdf5CaloChallengeSource",
    "CsvSource",
    "ParquetSource",
    "open_source",
    "read_showers",
    "write_showers",
    "file_sha256",
    "showers_to_table",
    "PARQUET_METADATA_KEY",
]

logger = logging.getLogger(__name__)

GEV = 1000.0  # MeV per GeV
PARQUET_METADATA_KEY = b"calodistill"
HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf")
PARQUET_EXTENSIONS = (".parquet", ".pq")
CSV_EXTENSIONS = (".csv",)
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_CSV_INDEX_STRIDE = 4096  # rows between two entries of a CSV file's byte-offset index


def file_sha256(path: str | os.PathLike[str], block: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def resolve_geometry(name: str | Geometry | None, source: str) -> Geometry | None:
    """A geometry object, or the registered one named ``name`` (None passes through); errors name ``source``."""
    if name is None or isinstance(name, Geometry):
        return name
    try:
        return get_geometry(name)
    except CalodistillError as exc:
        raise CalodistillError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------------------------- columns
@dataclass(frozen=True)
class ColumnSpec:
    """Which columns of a CSV/Parquet table hold what (see the module docstring for the defaults).

    Args:
        incident_energy: name of the incident-energy column.
        energy_unit: ``"MeV"`` or ``"GeV"`` (incident energy only; voxels are always MeV).
        voxels: a list column's name, or a prefix pattern ending in ``*`` (``"v*"`` → ``v0, v1, ...``).
        particle: name of the optional particle column.
        event_id: name of the optional event-id column.
    """

    incident_energy: str = "incident_energy"
    energy_unit: str = "MeV"
    voxels: str = "voxels|v*"
    particle: str = "particle"
    event_id: str = "event_id"

    def __post_init__(self) -> None:
        if self.energy_unit not in ("MeV", "GeV"):
            raise CalodistillError(f"columns: energy_unit must be MeV or GeV, not {self.energy_unit!r}")

    @classmethod
    def parse(cls, text: str | dict[str, str] | ColumnSpec | None) -> ColumnSpec:
        """From ``None`` (defaults), a dict, or ``"key=value,key=value"`` (the ``--columns`` option)."""
        if text is None:
            return cls()
        if isinstance(text, ColumnSpec):
            return text
        if isinstance(text, str):
            items: dict[str, str] = {}
            for part in filter(None, (p.strip() for p in text.split(","))):
                key, sep, value = part.partition("=")
                if not sep:
                    raise CalodistillError(f"columns: expected key=value, got {part!r}")
                items[key.strip()] = value.strip()
        else:
            items = dict(text)
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(items) - known)
        if unknown:
            raise CalodistillError(f"columns: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**items)

    def voxel_columns(self, names: list[str], source: str) -> tuple[str, list[str]]:
        """Resolve the voxel columns among a table's ``names``: ``("list", [name])`` or ``("scalar", [v0..])``."""
        for option in self.voxels.split("|"):
            if option.endswith("*"):
                prefix = option[:-1]
                pattern = re.compile(re.escape(prefix) + r"(\d+)$")
                found = sorted(((int(m.group(1)), n) for n in names if (m := pattern.match(n))))
                if found:
                    numbers = [i for i, _ in found]
                    if numbers != list(range(len(numbers))):
                        raise CalodistillError(
                            f"{source}: voxel columns {prefix}0..{prefix}{len(numbers) - 1} are not contiguous"
                        )
                    return "scalar", [n for _, n in found]
            elif option in names:
                return "list", [option]
        raise CalodistillError(f"{source}: missing voxel columns (looked for {self.voxels!r})")


# --------------------------------------------------------------------------------------------- sources
@dataclass
class Source:
    """A shower file opened for chunked reading (picklable; holds no open file handle).

    Args:
        path: the file.
        geometry: its geometry.
        n_rows: number of showers.
        kind: ``calogan``, ``calochallenge``, ``csv``, ``parquet`` (or ``synth`` for generated sources).
        chunk_rows: preferred alignment of row ranges (HDF5 chunking, synthetic chunk size); 1 = none.
    """

    path: str
    geometry: Geometry
    n_rows: int
    kind: str
    chunk_rows: int = 1
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str:
        """SHA-256 of the file (computed once, on first use)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    @property
    def bytes_per_row(self) -> int:
        """Uncompressed bytes of one shower in memory (voxels float32 + incident energy)."""
        return 4 * self.geometry.n_voxels + 8

    def describe(self) -> dict[str, Any]:
        """JSON-able description for dataset metadata (computes the sha256)."""
        return {"path": self.path, "kind": self.kind, "sha256": self.sha256, "n_rows": self.n_rows}

    def read(self, start: int = 0, stop: int | None = None) -> Showers:
        """Showers ``start .. stop-1``, validated, in MeV."""
        stop = self.n_rows if stop is None else min(stop, self.n_rows)
        if not 0 <= start <= stop:
            raise CalodistillError(f"{self.path}: bad row range {start}:{stop} of {self.n_rows} rows")
        return self._read(start, stop)

    def _read(self, start: int, stop: int) -> Showers:  # pragma: no cover - abstract
        raise NotImplementedError

    # shared validation ----------------------------------------------------------------------------
    def _validated(
        self,
        start: int,
        incident: np.ndarray,
        voxels: np.ndarray,
        particle: Any = None,
        event_id: np.ndarray | None = None,
    ) -> Showers:
        validate_arrays(self.path, incident, voxels, row_offset=start)
        if event_id is None:
            event_id = np.arange(start, start + len(incident), dtype=np.int64)
        if particle is None:
            particle = self.geometry.particle or "unknown"
        return Showers(self.geometry, incident, voxels, particle, event_id)


def validate_arrays(path: str, incident: np.ndarray, voxels: np.ndarray, row_offset: int = 0) -> None:
    """Raise a one-line :class:`CalodistillError` for non-finite or negative energies (``path`` names the file)."""
    if len(incident) != len(voxels):
        raise CalodistillError(f"{path}: {len(incident)} incident energies but {len(voxels)} showers")
    bad = ~np.isfinite(incident)
    if bad.any():
        raise CalodistillError(f"{path}: non-finite incident energy (NaN/inf) in row {row_offset + int(np.argmax(bad))}")
    bad = incident <= 0
    if bad.any():
        i = int(np.argmax(bad))
        raise CalodistillError(f"{path}: non-positive incident energy {incident[i]!r} in row {row_offset + i}")
    finite = np.isfinite(voxels)
    if not finite.all():
        i = int(np.argmax(~finite.all(axis=1)))
        raise CalodistillError(f"{path}: non-finite voxel energy (NaN/inf) in row {row_offset + i}")
    negative = voxels < 0
    if negative.any():
        i = int(np.argmax(negative.any(axis=1)))
        raise CalodistillError(
            f"{path}: negative voxel energy {float(voxels[i][voxels[i] < 0].min())!r} MeV in row {row_offset + i}"
        )


def _as_rows(path: str, name: str, arr_shape: tuple[int, ...], n: int | None = None) -> int:
    if len(arr_shape) == 0:
        raise CalodistillError(f"{path}: dataset {name!r} is a scalar, expected one row per shower")
    if n is not None and arr_shape[0] != n:
        raise CalodistillError(f"{path}: dataset {name!r} has {arr_shape[0]} rows, expected {n} (mismatched lengths)")
    return int(arr_shape[0])


def _check_energy_shape(path: str, name: str, shape: tuple[int, ...]) -> None:
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise CalodistillError(f"{path}: dataset {name!r} has shape {shape}, expected (N,) or (N, 1)")


class _H5File:
    """``with _H5File(path) as f``: h5py file opened read-only; corrupt/truncated files → CalodistillError."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fh: Any = None

    def __enter__(self) -> Any:
        import h5py

        try:
            self.fh = h5py.File(self.path, "r")
        except OSError as exc:
            raise CalodistillError(f"{self.path}: not a readable HDF5 file (truncated or corrupt): {_short(exc)}") from None
        return self.fh

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160]


def _h5_read(path: str, dset: Any, sel: Any) -> np.ndarray:
    try:
        return np.asarray(dset[sel])
    except (OSError, ValueError, RuntimeError) as exc:
        raise CalodistillError(
            f"{path}: cannot read dataset {dset.name!r} (truncated or corrupt file): {_short(exc)}"
        ) from None


def _h5_chunk_rows(dset: Any) -> int:
    return int(dset.chunks[0]) if dset.chunks else 1


@dataclass
class Hdf5CaloGANSource(Source):
    """CaloGAN HDF5: ``energy`` GeV, ``layer_0..2`` MeV, optional ``overflow``."""

    def _read(self, start: int, stop: int) -> Showers:
        with _H5File(self.path) as f:
            energy = _h5_read(self.path, f["energy"], slice(start, stop)).reshape(-1).astype(np.float64) * GEV
            layers = [_h5_read(self.path, f[f"layer_{i}"], slice(start, stop)) for i in range(self.geometry.n_layers)]
        voxels = self.geometry.join_layers([np.asarray(a, dtype=np.float32) for a in layers])
        return self._validated(start, energy, voxels)


@dataclass
class Hdf5CaloChallengeSource(Source):
    """CaloChallenge HDF5: ``incident_energies`` (N, 1) MeV, ``showers`` (N, D) MeV."""

    def _read(self, start: int, stop: int) -> Showers:
        with _H5File(self.path) as f:
            energy = _h5_read(self.path, f["incident_energies"], slice(start, stop)).reshape(-1).astype(np.float64)
            voxels = _h5_read(self.path, f["showers"], slice(start, stop)).astype(np.float32, copy=False)
        return self._validated(start, energy, voxels)


def _open_hdf5(path: str, geometry: Geometry | None) -> Source:
    with _H5File(path) as f:
        keys = set(f.keys())
        if {"energy", "layer_0"} <= keys or ("energy" in keys and not {"incident_energies", "showers"} & keys):
            return _open_calogan(path, f, geometry)
        if {"incident_energies", "showers"} & keys:
            return _open_calochallenge(path, f, geometry)
        raise CalodistillError(
            f"{path}: missing keys: neither CaloGAN ('energy', 'layer_0..2') nor CaloChallenge "
            f"('incident_energies', 'showers'); found {sorted(keys) or 'no datasets'}"
        )


def _open_calogan(path: str, f: Any, geometry: Geometry | None) -> Source:
    geo = geometry or get_geometry("calogan")
    if geo.name != "calogan":
        raise CalodistillError(f"{path}: a CaloGAN-layout file cannot hold geometry {geo.name}")
    missing = [k for k in ["energy", *(f"layer_{i}" for i in range(geo.n_layers))] if k not in f]
    if missing:
        raise CalodistillError(f"{path}: missing key(s) {', '.join(missing)} (CaloGAN layout)")
    _check_energy_shape(path, "energy", f["energy"].shape)
    n = _as_rows(path, "energy", f["energy"].shape)
    for i, layer in enumerate(geo.layers):
        shape = f[f"layer_{i}"].shape
        _as_rows(path, f"layer_{i}", shape, n)
        if tuple(shape[1:]) != layer.shape:
            raise CalodistillError(f"{path}: dataset 'layer_{i}' has shape {shape}, expected (N, {layer.shape[0]}, {layer.shape[1]})")
    if "overflow" in f:
        shape = f["overflow"].shape
        _as_rows(path, "overflow", shape, n)
        if tuple(shape[1:]) != (geo.n_layers,):
            raise CalodistillError(f"{path}: dataset 'overflow' has shape {shape}, expected (N, {geo.n_layers})")
    if n == 0:
        raise CalodistillError(f"{path}: empty file (no showers)")
    return Hdf5CaloGANSource(path, geo, n, "calogan", chunk_rows=_h5_chunk_rows(f["layer_0"]))


def _open_calochallenge(path: str, f: Any, geometry: Geometry | None) -> Source:
    missing = [k for k in ("incident_energies", "showers") if k not in f]
    if missing:
        raise CalodistillError(f"{path}: missing key(s) {', '.join(missing)} (CaloChallenge layout)")
    _check_energy_shape(path, "incident_energies", f["incident_energies"].shape)
    shape = f["showers"].shape
    if len(shape) != 2:
        raise CalodistillError(f"{path}: dataset 'showers' has shape {shape}, expected (N, voxels)")
    n = _as_rows(path, "incident_energies", f["incident_energies"].shape)
    _as_rows(path, "showers", shape, n)
    geo = geometry or infer_geometry(int(shape[1]), path)
    if shape[1] != geo.n_voxels:
        raise CalodistillError(f"{path}: {shape[1]} voxels per shower, geometry {geo.name} has {geo.n_voxels}")
    if n == 0:
        raise CalodistillError(f"{path}: empty file (no showers)")
    return Hdf5CaloChallengeSource(path, geo, n, "calochallenge", chunk_rows=_h5_chunk_rows(f["showers"]))


def _frame_to_showers(src: Source, frame: Any, start: int, cols: ColumnSpec, voxel_names: list[str]) -> Showers:
    """A pandas DataFrame (CSV chunk) → validated Showers."""
    import pandas as pd

    path = src.path
    try:
        incident = pd.to_numeric(frame[cols.incident_energy], errors="raise").to_numpy(np.float64)
        voxels = frame[voxel_names].apply(pd.to_numeric, errors="raise").to_numpy(np.float32)
    except (ValueError, TypeError) as exc:
        raise CalodistillError(f"{path}: non-numeric value in rows {start}..{start + len(frame) - 1}: {_short(exc)}") from None
    if cols.energy_unit == "GeV":
        incident = incident * GEV
    particle = frame[cols.particle].astype(str).to_numpy(object) if cols.particle in frame else None
    event_id = None
    if cols.event_id in frame:
        event_id = pd.to_numeric(frame[cols.event_id], errors="coerce").to_numpy()
        if np.isnan(event_id.astype(np.float64)).any():
            raise CalodistillError(f"{path}: column {cols.event_id!r} holds a non-integer value")
        event_id = event_id.astype(np.int64)
    return src._validated(start, incident, voxels, particle, event_id)


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
                dtype={self.columns.particle: str} if self.columns.particle in self.header else None,
            )
        except (ValueError, pd.errors.ParserError) as exc:
            raise CalodistillError(f"{self.path}: malformed CSV in rows {start}..{stop - 1}: {_short(exc)}") from None
        if len(frame) != stop - start:
            raise CalodistillError(f"{self.path}: expected {stop - start} rows from row {start}, read {len(frame)}")
        if frame.isna().to_numpy().any():
            bad = frame.isna().any(axis=1).to_numpy()
            raise CalodistillError(f"{self.path}: missing or NaN value in row {start + int(np.argmax(bad))}")
        return _frame_to_showers(self, frame, start, self.columns, self.voxel_names)


def _open_csv(path: str, geometry: Geometry | None, cols: ColumnSpec) -> Source:
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
        raise CalodistillError(f"{path}: unreadable CSV header: {_short(exc)}") from None
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
            raise CalodistillError(f"{self.path}: cannot read Parquet rows {start}..{stop - 1}: {_short(exc)}") from None
        table = table.slice(start - (starts[groups[0]] if groups else 0), stop - start)
        incident = _column_numpy(self.path, table.column(cols.incident_energy), np.float64, cols.incident_energy)
        if cols.energy_unit == "GeV":
            incident = incident * GEV
        if self.voxel_kind == "list":
            voxels = list_column_to_numpy(table.column(self.voxel_names[0]), self.geometry.n_voxels, self.path)
        else:
            voxels = np.empty((table.num_rows, len(self.voxel_names)), dtype=np.float32)
            for j, name in enumerate(self.voxel_names):
                voxels[:, j] = _column_numpy(self.path, table.column(name), np.float32, name)
        particle = None
        if cols.particle in table.column_names:
            particle = np.asarray(table.column(cols.particle).cast(pa.string()).to_pylist(), dtype=object)
        event_id = None
        if cols.event_id in table.column_names:
            event_id = _column_numpy(self.path, table.column(cols.event_id), np.int64, cols.event_id)
        return self._validated(start, incident, voxels, particle, event_id)


def _column_numpy(path: str, column: Any, dtype: Any, name: str) -> np.ndarray:
    import pyarrow as pa

    if column.null_count:
        raise CalodistillError(f"{path}: column {name!r} has {column.null_count} missing value(s)")
    try:
        return column.to_numpy().astype(dtype, copy=False)
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise CalodistillError(f"{path}: column {name!r} is not numeric: {_short(exc)}") from None


def list_column_to_numpy(column: Any, width: int, path: str = "parquet") -> np.ndarray:
    """A (chunked) list / fixed-size-list column of floats → ``(N, width)`` float32, without Python loops."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = np.empty((sum(len(c) for c in chunks), width), dtype=np.float32)
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
            raise CalodistillError(f"{path}: voxel values are not numeric: {_short(exc)}") from None
        out[row : row + n] = flat.reshape(n, width)
        row += n
    return out


def _parquet_geometry_hint(schema: Any) -> str | None:
    meta = schema.metadata or {}
    if PARQUET_METADATA_KEY in meta:
        try:
            return json.loads(meta[PARQUET_METADATA_KEY])["geometry"]["name"]
        except (ValueError, KeyError, TypeError):
            return None
    return None


def _open_parquet(path: str, geometry: Geometry | None, cols: ColumnSpec) -> Source:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise CalodistillError(f"{path}: not a readable Parquet file (truncated or corrupt): {_short(exc)}") from None
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
            geometry = resolve_geometry(hint, path)
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


def open_source(
    path: str | os.PathLike[str],
    geometry: str | Geometry | None = None,
    columns: str | dict[str, str] | ColumnSpec | None = None,
) -> Source:
    """Open a shower file for chunked reading; the format follows the extension (and, for HDF5, its keys).

    Args:
        path: ``.h5``/``.hdf5`` (CaloGAN or CaloChallenge layout), ``.csv`` or ``.parquet``.
        geometry: geometry name; ``None`` infers it from the layout / the voxel count.
        columns: column declaration for tables (:class:`ColumnSpec`, dict or ``"key=value,..."``).

    Raises:
        CalodistillError: a missing, empty, corrupt or malformed file, or an unknown / unfitting geometry.
    """
    spath = str(path)
    geo = resolve_geometry(geometry, spath)
    cols = ColumnSpec.parse(columns)
    p = Path(spath)
    if not p.exists():
        raise CalodistillError(f"{spath}: no such file")
    if p.is_dir():
        raise CalodistillError(f"{spath}: is a directory, expected a shower file")
    if p.stat().st_size == 0:
        raise CalodistillError(f"{spath}: empty file")
    suffix = p.suffix.lower()
    if suffix in HDF5_EXTENSIONS:
        with open(spath, "rb") as fh:
            if fh.read(8) != _HDF5_SIGNATURE:
                raise CalodistillError(f"{spath}: not an HDF5 file (bad signature; truncated or corrupt)")
        return _open_hdf5(spath, geo)
    if suffix in CSV_EXTENSIONS:
        return _open_csv(spath, geo, cols)
    if suffix in PARQUET_EXTENSIONS:
        return _open_parquet(spath, geo, cols)
    raise CalodistillError(f"{spath}: unknown file type {suffix!r} (expected .h5/.hdf5, .csv or .parquet)")


def read_showers(
    path: str | os.PathLike[str],
    geometry: str | Geometry | None = None,
    columns: str | dict[str, str] | ColumnSpec | None = None,
) -> Showers:
    """Read a whole shower file (see :func:`open_source` for formats and errors)."""
    src = open_source(path, geometry, columns)
    return src.read(0, src.n_rows)


# --------------------------------------------------------------------------------------------- writers
def showers_to_table(showers: Showers, split: np.ndarray | None = None, metadata: dict | None = None) -> Any:
    """The Arrow table of the calodistill Parquet layout (see :mod:`pipeline.ingest`).

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


def _atomic_target(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def write_showers(showers: Showers, path: str | os.PathLike[str], fmt: str | None = None) -> Path:
    """Write showers atomically (temporary file beside ``path``, then ``os.replace``).

    Args:
        showers: what to write.
        path: target file; the extension picks the format unless ``fmt`` is given.
        fmt: ``"calogan"`` (CaloGAN HDF5: ``energy`` GeV (N,1), ``layer_0..2`` MeV, ``overflow`` zeros),
            ``"calochallenge"`` (``incident_energies`` (N,1) MeV, ``showers`` (N,D) MeV), ``"hdf5"`` (the
            geometry's native layout: CaloGAN for ``calogan``, CaloChallenge otherwise), ``"parquet"``
            (one file, the calodistill layout with the geometry in the schema metadata) or ``"csv"``
            (``event_id, incident_energy, particle, v0..v{D-1}``).

    Returns:
        The path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if fmt is None:
        if suffix in HDF5_EXTENSIONS:
            fmt = "hdf5"
        elif suffix in PARQUET_EXTENSIONS:
            fmt = "parquet"
        elif suffix in CSV_EXTENSIONS:
            fmt = "csv"
        else:
            raise CalodistillError(f"{path}: unknown output type {suffix!r} (use .h5/.hdf5, .parquet or .csv)")
    if fmt == "hdf5":
        fmt = "calogan" if showers.geometry.name == "calogan" else "calochallenge"
    if fmt not in ("calogan", "calochallenge", "parquet", "csv"):
        raise CalodistillError(f"{path}: unknown output format {fmt!r}")
    if fmt == "calogan" and showers.geometry.name != "calogan":
        raise CalodistillError(f"{path}: CaloGAN layout needs the calogan geometry, not {showers.geometry.name}")
    if not path.parent.is_dir():
        raise CalodistillError(f"{path}: directory {path.parent} does not exist")
    tmp = _atomic_target(path)
    try:
        if fmt in ("calogan", "calochallenge"):
            _write_hdf5(showers, tmp, fmt)
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            meta = {"geometry": showers.geometry.to_dict(), "units": "MeV"}
            pq.write_table(showers_to_table(showers, metadata=meta), tmp, compression="zstd")
        else:
            _write_csv(showers, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %d showers (%s) to %s", len(showers), fmt, path)
    return path


def _write_hdf5(showers: Showers, tmp: Path, fmt: str) -> None:
    import h5py

    n = len(showers)

    def opts(row_shape: tuple[int, ...]) -> dict[str, Any]:
        # gzip in ~1 MiB row chunks, so chunked readers (Dask ingest) read whole chunks
        if n == 0:
            return {}
        rows = max(1, min(n, (1 << 20) // (4 * int(np.prod(row_shape)))))
        return {"chunks": (rows, *row_shape), "compression": "gzip", "compression_opts": 4}

    with h5py.File(tmp, "w") as f:
        if fmt == "calogan":
            f.create_dataset("energy", data=(showers.incident_energy / GEV).reshape(n, 1))
            for i, arr in enumerate(showers.geometry.split_layers(showers.voxels)):
                f.create_dataset(f"layer_{i}", data=arr, **opts(arr.shape[1:]))
            f.create_dataset("overflow", data=np.zeros((n, showers.geometry.n_layers)))
        else:
            f.create_dataset("incident_energies", data=showers.incident_energy.reshape(n, 1))
            f.create_dataset("showers", data=showers.voxels, **opts(showers.voxels.shape[1:]))
        f.attrs["geometry"] = showers.geometry.name
        f.attrs["units"] = "MeV (energy: GeV)" if fmt == "calogan" else "MeV"


def _write_csv(showers: Showers, tmp: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(showers.voxels, columns=[f"v{i}" for i in range(showers.geometry.n_voxels)])
    frame.insert(0, "particle", showers.particle)
    frame.insert(0, "incident_energy", showers.incident_energy)
    frame.insert(0, "event_id", showers.event_id)
    frame.to_csv(tmp, index=False)

