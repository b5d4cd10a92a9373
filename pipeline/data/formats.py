"""Shower files in and out: the format follows the file's extension (and, for HDF5, its keys).

Readers return :class:`~.showers.Showers` in MeV, validated; writers are atomic. The formats themselves
live in :mod:`.hdf5` (CaloGAN, CaloChallenge, mapped datasets), :mod:`.tables` (CSV, Parquet) and
:mod:`.root` (ROOT trees through uproot); chunked access (what the Dask ingest uses) goes through the
:class:`~.source.Source` that :func:`open_source` returns. A column mapping (:mod:`.columns`) names the
columns of tables, ROOT trees and non-standard HDF5 files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..atomic import atomic_path
from ..errors import CalodistillError
from .geometry import Geometry
from .columns import ColumnSpec
from .hdf5 import open_hdf5, write_hdf5
from .root import ROOT_EXTENSIONS, open_root, split_root_path, write_root
from .showers import Showers
from .source import Source, resolve_geometry
from .tables import open_csv, open_parquet, write_csv, write_parquet

__all__ = ["open_source", "read_showers", "write_showers"]

logger = logging.getLogger(__name__)

HDF5_EXTENSIONS = (".h5", ".hdf5", ".hdf")
PARQUET_EXTENSIONS = (".parquet", ".pq")
CSV_EXTENSIONS = (".csv",)


def open_source(
    path: str | os.PathLike[str],
    geometry: str | Geometry | None = None,
    columns: str | dict[str, str] | ColumnSpec | None = None,
) -> Source:
    """Open a shower file for chunked reading; the format follows the extension (and, for HDF5, its keys).

    Args:
        path: ``.h5``/``.hdf5`` (CaloGAN or CaloChallenge layout, or any layout with ``columns``),
            ``.csv``, ``.parquet``, or ``.root`` (``file.root:tree`` names the tree).
        geometry: geometry name or geometry file; ``None`` uses the one the file records, else infers it
            from the voxel count.
        columns: the column mapping (:class:`~.columns.ColumnSpec`, a dict, ``"key=value,..."`` or a
            mapping file).

    Raises:
        CalodistillError: a missing, empty, corrupt or malformed file, or an unknown / unfitting geometry.
    """
    spath = str(path)
    geo = resolve_geometry(geometry, spath)
    cols = ColumnSpec.parse(columns)
    file, _ = split_root_path(spath)
    p = Path(file)
    if not p.exists():
        raise CalodistillError(f"{file}: no such file")
    if p.is_dir():
        raise CalodistillError(f"{file}: is a directory, expected a shower file")
    if p.stat().st_size == 0:
        raise CalodistillError(f"{file}: empty file")
    suffix = p.suffix.lower()
    if suffix in ROOT_EXTENSIONS:
        return open_root(spath, geo, cols)
    if suffix in HDF5_EXTENSIONS:
        return open_hdf5(spath, geo, cols)
    if suffix in CSV_EXTENSIONS:
        return open_csv(spath, geo, cols)
    if suffix in PARQUET_EXTENSIONS:
        return open_parquet(spath, geo, cols)
    raise CalodistillError(f"{spath}: unknown file type {suffix!r} (expected .h5/.hdf5, .root, .csv or .parquet)")


def read_showers(
    path: str | os.PathLike[str],
    geometry: str | Geometry | None = None,
    columns: str | dict[str, str] | ColumnSpec | None = None,
) -> Showers:
    """Read a whole shower file (see :func:`open_source` for formats and errors)."""
    src = open_source(path, geometry, columns)
    return src.read(0, src.n_rows)


def write_showers(showers: Showers, path: str | os.PathLike[str], fmt: str | None = None) -> Path:
    """Write showers atomically (:func:`~calodistill.pipeline.atomic.atomic_path`).

    Args:
        showers: what to write.
        path: target file; the extension picks the format unless ``fmt`` is given.
        fmt: ``"calogan"`` (CaloGAN HDF5: ``energy`` GeV (N,1), ``layer_0..2`` MeV, ``overflow`` zeros),
            ``"calochallenge"`` (``incident_energies`` (N,1) MeV, ``showers`` (N,D) MeV), ``"hdf5"`` (the
            geometry's native layout: CaloGAN for ``calogan``, CaloChallenge otherwise; a geometry from a
            file is stored in an attribute), ``"parquet"`` (one file, the calodistill layout with the
            geometry in the schema metadata), ``"root"`` (a TTree ``showers`` and the geometry record,
            :func:`~.root.write_root`) or ``"csv"`` (``event_id, incident_energy, particle, v0..v{D-1}``).

    Returns:
        The path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    accepted = ".h5/.hdf5, .parquet, .root or .csv"
    if path.is_dir():
        raise CalodistillError(f"{path}: is a directory; give a file name ending in {accepted}")
    if fmt is None:
        if suffix in HDF5_EXTENSIONS:
            fmt = "hdf5"
        elif suffix in PARQUET_EXTENSIONS:
            fmt = "parquet"
        elif suffix in CSV_EXTENSIONS:
            fmt = "csv"
        elif suffix in ROOT_EXTENSIONS:
            fmt = "root"
        else:
            what = f"unknown output type {suffix!r}" if suffix else "no file extension"
            raise CalodistillError(f"{path}: {what} (use {accepted})")
    if fmt == "hdf5":
        fmt = "calogan" if showers.geometry.name == "calogan" else "calochallenge"
    if fmt not in ("calogan", "calochallenge", "parquet", "csv", "root"):
        raise CalodistillError(f"{path}: unknown output format {fmt!r}")
    if fmt == "calogan" and showers.geometry.name != "calogan":
        raise CalodistillError(f"{path}: CaloGAN layout needs the calogan geometry, not {showers.geometry.name}")
    if not path.parent.is_dir():
        raise CalodistillError(f"{path}: directory {path.parent} does not exist")
    with atomic_path(path) as tmp:
        if fmt in ("calogan", "calochallenge"):
            write_hdf5(showers, tmp, fmt)
        elif fmt == "parquet":
            write_parquet(showers, tmp)
        elif fmt == "root":
            write_root(showers, tmp)
        else:
            write_csv(showers, tmp)
    logger.info("wrote %d showers (%s) to %s", len(showers), fmt, path)
    return path
