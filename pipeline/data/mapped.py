"""Entries of a mapped file (ROOT tree, HDF5 datasets) → validated showers, through a :class:`~.columns.ColumnSpec`.

The readers in :mod:`.root` and :mod:`.hdf5` list the columns and their per-entry shapes; this module
checks them against the geometry when the file is opened (so a bad file fails before any work), selects
the entries the filter keeps, and decodes each row range they read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import CalodistillError
from .columns import ColumnSpec
from .geometry import Geometry, infer_geometry
from .showers import Showers
from .source import Source

__all__ = ["check_voxel_layout", "decode_entries", "select_entries"]


def check_voxel_layout(path: str, names: list[str], shapes: list[tuple[int, ...]], geometry: Geometry | None) -> Geometry:
    """The geometry of the voxel columns ``names`` with per-entry ``shapes``; one-line errors for a mismatch.

    A single column of shape ``[layers][rows][columns]`` (axes of length 1 ignored) must match the
    geometry's layers exactly when they all have the same shape; several columns, one per layer, must
    each hold that layer's cells.
    """
    widths = [int(np.prod(s)) for s in shapes]
    total = sum(widths)
    label = ", ".join(repr(n) for n in names[:3]) + (f" ... ({len(names)} columns)" if len(names) > 3 else "")
    if geometry is None:
        try:
            geometry = infer_geometry(total, path)
        except CalodistillError as exc:
            raise CalodistillError(f"{exc}; pass --geometry NAME_OR_FILE") from None
    if total != geometry.n_voxels:
        shape = f" of shape {list(shapes[0])}" if len(names) == 1 and shapes[0] else ""
        raise CalodistillError(f"{path}: voxel column {label}{shape} holds {total} values per entry, "
                               f"geometry {geometry.describe()} has {geometry.n_voxels}")
    if len(names) == 1:
        dims = tuple(d for d in shapes[0] if d != 1)
        same = len({layer.shape for layer in geometry.layers}) == 1
        if len(dims) == 3 and same:
            expected = (geometry.n_layers, *geometry.layers[0].shape)
            if dims != expected:
                raise CalodistillError(f"{path}: voxel column {label} has axes {list(dims)} per entry, geometry "
                                       f"{geometry.name} expects [layers][rows][columns] = {list(expected)}")
    elif len(names) == geometry.n_layers and len(names) > 1:
        for name, width, layer in zip(names, widths, geometry.layers):
            if width != layer.n_voxels:
                raise CalodistillError(f"{path}: voxel column {name!r} holds {width} values per entry, layer "
                                       f"{layer.index} of {geometry.name} has {layer.n_voxels} cells")
    return geometry


def select_entries(path: str, cols: ColumnSpec, values: dict[str, np.ndarray]) -> np.ndarray | None:
    """Indices of the entries the filter keeps (None: no filter); the filter columns must be scalar numbers."""
    if not cols.filter:
        return None
    for name, arr in values.items():
        if arr.ndim != 1 or arr.dtype.kind not in "fiub":
            raise CalodistillError(f"{path}: filter column {name!r} must hold one number per entry, "
                                   f"got {arr.dtype} of shape {arr.shape[1:]}")
    keep = np.flatnonzero(cols.entry_mask(values))
    if keep.size == 0:
        raise CalodistillError(f"{path}: the filter {' and '.join(cols.filter)!r} keeps no entry")
    return keep.astype(np.int64)


def entry_range(selected: np.ndarray | None, start: int, stop: int) -> tuple[int, int, np.ndarray | None]:
    """The file's entry range covering rows ``start:stop`` and the positions of those rows in it."""
    if selected is None:
        return start, stop, None
    rows = selected[start:stop]
    if rows.size == 0:
        return 0, 0, rows
    return int(rows[0]), int(rows[-1]) + 1, rows - rows[0]


def decode_entries(src: Source, cols: ColumnSpec, raw: dict[str, Any], voxel_names: list[str], start: int) -> Showers:
    """Decode the raw column arrays of rows ``start ..`` (units, log10, sentinel, particle codes) and validate."""
    path = src.path
    n = len(raw[cols.incident_energy])
    parts = []
    for name in voxel_names:
        arr = np.asarray(raw[name])
        if arr.dtype.kind not in "fiub":
            raise CalodistillError(f"{path}: voxel column {name!r} is not numeric ({arr.dtype})")
        parts.append(arr.reshape(n, -1))
    flat = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    if flat.shape[1] != src.geometry.n_voxels:
        raise CalodistillError(f"{path}: {flat.shape[1]} voxel values per entry from row {start}, "
                               f"geometry {src.geometry.name} has {src.geometry.n_voxels}")
    incident_raw = np.asarray(raw[cols.incident_energy])
    if incident_raw.dtype.kind not in "fiu":
        raise CalodistillError(f"{path}: column {cols.incident_energy!r} is not numeric ({incident_raw.dtype})")
    incident = cols.incident_to_mev(incident_raw, path, start)
    voxels = cols.voxels_to_mev(flat, path, start)
    particle = cols.particles(raw[cols.particle], path, start) if cols.particle in raw else None
    event_id = None
    if cols.event_id in raw:
        ids = np.asarray(raw[cols.event_id]).reshape(-1)
        if ids.dtype.kind not in "iu":
            raise CalodistillError(f"{path}: column {cols.event_id!r} holds non-integer event ids ({ids.dtype})")
        event_id = ids.astype(np.int64)
    return src._validated(start, incident, voxels, particle, event_id, energy_unit=cols.energy_unit)
