"""CaloGAN and CaloChallenge HDF5 files: chunked readers and the writer.

- CaloGAN (hep-lbdl/CaloGAN): ``energy`` (N, 1) or (N,) **GeV**; ``layer_0`` (N, 3, 96), ``layer_1``
  (N, 12, 12), ``layer_2`` (N, 12, 6) MeV; ``overflow`` (N, 3) MeV, optional on read (its energy lies
  outside the cells, so it is not part of the voxels) and written as zeros.
- CaloChallenge 2022: ``incident_energies`` (N, 1) or (N,) MeV; ``showers`` (N, D) MeV in the binning
  XML's voxel order. The geometry is given, read from the file's ``calodistill_geometry`` attribute
  (written for geometries from a file) or inferred from D.
- Any other layout, through a column mapping (:class:`~.columns.ColumnSpec`): the datasets it names (in
  the group ``tree`` when the file has one, else at the root), with their units and encodings, as for a
  ROOT tree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalodistillError
from .columns import ColumnSpec
from .geometry import GEOMETRY_NAMES, Geometry, get_geometry, infer_geometry
from .mapped import check_voxel_layout, decode_entries, entry_range, select_entries
from .showers import Showers
from .source import GEV, Source, one_line

__all__ = ["Hdf5CaloChallengeSource", "Hdf5CaloGANSource", "Hdf5MappedSource", "open_hdf5", "write_hdf5"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
GEOMETRY_ATTR = "calodistill_geometry"


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
            raise CalodistillError(f"{self.path}: not a readable HDF5 file (truncated or corrupt): {one_line(exc)}") from None
        return self.fh

    def __exit__(self, *exc: object) -> None:
        self.fh.close()


def _h5_read(path: str, dset: Any, sel: Any) -> np.ndarray:
    try:
        return np.asarray(dset[sel])
    except (OSError, ValueError, RuntimeError) as exc:
        raise CalodistillError(
            f"{path}: cannot read dataset {dset.name!r} (truncated or corrupt file): {one_line(exc)}"
        ) from None


def _h5_chunk_rows(dset: Any) -> int:
    return int(dset.chunks[0]) if dset.chunks else 1


def _as_rows(path: str, name: str, arr_shape: tuple[int, ...], n: int | None = None) -> int:
    if len(arr_shape) == 0:
        raise CalodistillError(f"{path}: dataset {name!r} is a scalar, expected one row per shower")
    if n is not None and arr_shape[0] != n:
        raise CalodistillError(f"{path}: dataset {name!r} has {arr_shape[0]} rows, expected {n} (mismatched lengths)")
    return int(arr_shape[0])


def _check_energy_shape(path: str, name: str, shape: tuple[int, ...]) -> None:
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise CalodistillError(f"{path}: dataset {name!r} has shape {shape}, expected (N,) or (N, 1)")


@dataclass
class Hdf5CaloGANSource(Source):
    """CaloGAN HDF5: ``energy`` GeV, ``layer_0..2`` MeV, optional ``overflow``."""

    def _read(self, start: int, stop: int) -> Showers:
        with _H5File(self.path) as f:
            energy = _h5_read(self.path, f["energy"], slice(start, stop)).reshape(-1).astype(np.float64) * GEV
            layers = [_h5_read(self.path, f[f"layer_{i}"], slice(start, stop)) for i in range(self.geometry.n_layers)]
        voxels = self.geometry.join_layers([np.asarray(a, dtype=np.float32) for a in layers])
        return self._validated(start, energy, voxels, energy_unit="GeV")


@dataclass
class Hdf5CaloChallengeSource(Source):
    """CaloChallenge HDF5: ``incident_energies`` (N, 1) MeV, ``showers`` (N, D) MeV."""

    def _read(self, start: int, stop: int) -> Showers:
        with _H5File(self.path) as f:
            energy = _h5_read(self.path, f["incident_energies"], slice(start, stop)).reshape(-1).astype(np.float64)
            voxels = _h5_read(self.path, f["showers"], slice(start, stop)).astype(np.float32, copy=False)
        return self._validated(start, energy, voxels)


@dataclass
class Hdf5MappedSource(Source):
    """HDF5 datasets named by a column mapping (units, encodings, particle codes, entry filter)."""

    columns: ColumnSpec = field(default_factory=ColumnSpec)
    voxel_names: list[str] = field(default_factory=list)
    selected: np.ndarray | None = None

    def _read(self, start: int, stop: int) -> Showers:
        cols = self.columns
        lo, hi, rows = entry_range(self.selected, start, stop)
        with _H5File(self.path) as f:
            group = f[cols.tree] if cols.tree else f
            names = [cols.incident_energy, *self.voxel_names] + [c for c in (cols.particle, cols.event_id) if c in group]
            raw = {}
            for name in names:
                arr = _h5_read(self.path, group[name], slice(lo, hi))
                raw[name] = arr if rows is None else arr[rows]
        return decode_entries(self, cols, raw, self.voxel_names, start)


def open_hdf5(path: str, geometry: Geometry | None, columns: ColumnSpec | None = None) -> Source:
    """Open an HDF5 shower file; its keys tell CaloGAN from CaloChallenge layout, a column mapping any other."""
    with open(path, "rb") as fh:
        if fh.read(8) != _HDF5_SIGNATURE:
            raise CalodistillError(f"{path}: not an HDF5 file (bad signature; truncated or corrupt)")
    with _H5File(path) as f:
        if columns is not None and not columns.is_default:
            return _open_mapped(path, f, geometry, columns)
        keys = set(f.keys())
        if {"energy", "layer_0"} <= keys or ("energy" in keys and not {"incident_energies", "showers"} & keys):
            return _open_calogan(path, f, geometry)
        if {"incident_energies", "showers"} & keys:
            return _open_calochallenge(path, f, geometry)
        raise CalodistillError(
            f"{path}: missing keys: neither CaloGAN ('energy', 'layer_0..2') nor CaloChallenge "
            f"('incident_energies', 'showers'); found {sorted(keys) or 'no datasets'} (other layouts: --columns FILE)"
        )


def _open_mapped(path: str, f: Any, geometry: Geometry | None, cols: ColumnSpec) -> Source:
    import h5py

    # the mapping's tree is a group when the file has one of that name; else the datasets are at the root
    # (the same mapping then serves a ROOT tree and its HDF5 export)
    if cols.tree and not isinstance(f.get(cols.tree), h5py.Group):
        cols = replace(cols, tree="")
    group = f[cols.tree] if cols.tree else f
    names = [k for k in group.keys() if isinstance(group[k], h5py.Dataset)]
    if cols.incident_energy not in names:
        raise CalodistillError(f"{path}: missing dataset {cols.incident_energy!r} (incident energy); found {', '.join(names)}")
    _check_energy_shape(path, cols.incident_energy, group[cols.incident_energy].shape)
    n = _as_rows(path, cols.incident_energy, group[cols.incident_energy].shape)
    _, voxel_names = cols.voxel_columns(names, path)
    for name in voxel_names:
        _as_rows(path, name, group[name].shape, n)
    for name in (cols.particle, cols.event_id):
        if name in names:
            _as_rows(path, name, group[name].shape, n)
    geo = check_voxel_layout(path, voxel_names, [tuple(group[v].shape[1:]) for v in voxel_names], geometry)
    missing = [c for c in cols.filter_columns if c not in names]
    if missing:
        raise CalodistillError(f"{path}: filter column {missing[0]!r} is not a dataset; found {', '.join(names)}")
    selected = select_entries(path, cols, {c: _h5_read(path, group[c], slice(None)) for c in cols.filter_columns})
    n_rows = n if selected is None else len(selected)
    if n_rows == 0:
        raise CalodistillError(f"{path}: empty file (no showers)")
    chunk = _h5_chunk_rows(group[voxel_names[0]]) if selected is None else 1
    return Hdf5MappedSource(path, geo, n_rows, "hdf5", chunk_rows=chunk, columns=cols, voxel_names=voxel_names,
                            selected=selected)


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
    if geometry is None and GEOMETRY_ATTR in f.attrs:
        try:
            record = json.loads(f.attrs[GEOMETRY_ATTR])
        except (TypeError, ValueError):
            raise CalodistillError(f"{path}: attribute {GEOMETRY_ATTR!r} is not a geometry record (JSON)") from None
        geometry = Geometry.from_dict(record, path)
    geo = geometry or infer_geometry(int(shape[1]), path)
    if shape[1] != geo.n_voxels:
        raise CalodistillError(f"{path}: {shape[1]} voxels per shower, geometry {geo.name} has {geo.n_voxels}")
    if n == 0:
        raise CalodistillError(f"{path}: empty file (no showers)")
    return Hdf5CaloChallengeSource(path, geo, n, "calochallenge", chunk_rows=_h5_chunk_rows(f["showers"]))


def write_hdf5(showers: Showers, path: Path, layout: str) -> None:
    """Write ``showers`` to ``path`` (not atomically: callers pass a temporary path).

    Args:
        showers: what to write.
        path: the file to create.
        layout: ``"calogan"`` or ``"calochallenge"`` (see the module docstring).
    """
    import h5py

    n = len(showers)

    def opts(row_shape: tuple[int, ...]) -> dict[str, Any]:
        # gzip in ~1 MiB row chunks, so chunked readers (Dask ingest) read whole chunks
        if n == 0:
            return {}
        rows = max(1, min(n, (1 << 20) // (4 * int(np.prod(row_shape)))))
        return {"chunks": (rows, *row_shape), "compression": "gzip", "compression_opts": 4}

    with h5py.File(path, "w") as f:
        if layout == "calogan":
            f.create_dataset("energy", data=(showers.incident_energy / GEV).reshape(n, 1))
            for i, arr in enumerate(showers.geometry.split_layers(showers.voxels)):
                f.create_dataset(f"layer_{i}", data=arr, **opts(arr.shape[1:]))
            f.create_dataset("overflow", data=np.zeros((n, showers.geometry.n_layers)))
        else:
            f.create_dataset("incident_energies", data=showers.incident_energy.reshape(n, 1))
            f.create_dataset("showers", data=showers.voxels, **opts(showers.voxels.shape[1:]))
        f.attrs["geometry"] = showers.geometry.name
        f.attrs["units"] = "MeV (energy: GeV)" if layout == "calogan" else "MeV"
        if showers.geometry.name not in GEOMETRY_NAMES:  # a geometry from a file travels with the showers
            f.attrs[GEOMETRY_ATTR] = json.dumps(showers.geometry.to_dict())
