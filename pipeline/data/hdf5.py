"""CaloGAN and CaloChallenge HDF5 files: chunked readers and the writer.

- CaloGAN (hep-lbdl/CaloGAN): ``energy`` (N, 1) or (N,) **GeV**; ``layer_0`` (N, 3, 96), ``layer_1``
  (N, 12, 12), ``layer_2`` (N, 12, 6) MeV; ``overflow`` (N, 3) MeV, optional on read (its energy lies
  outside the cells, so it is not part of the voxels) and written as zeros.
- CaloChallenge 2022: ``incident_energies`` (N, 1) or (N,) MeV; ``showers`` (N, D) MeV in the binning
  XML's voxel order. The geometry is given or inferred from D.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CalodistillError
from .geometry import Geometry, get_geometry, infer_geometry
from .showers import Showers
from .source import GEV, Source, one_line

__all__ = ["Hdf5CaloChallengeSource", "Hdf5CaloGANSource", "open_hdf5", "write_hdf5"]

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


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
        return self._validated(start, energy, voxels)


@dataclass
class Hdf5CaloChallengeSource(Source):
    """CaloChallenge HDF5: ``incident_energies`` (N, 1) MeV, ``showers`` (N, D) MeV."""

    def _read(self, start: int, stop: int) -> Showers:
        with _H5File(self.path) as f:
            energy = _h5_read(self.path, f["incident_energies"], slice(start, stop)).reshape(-1).astype(np.float64)
            voxels = _h5_read(self.path, f["showers"], slice(start, stop)).astype(np.float32, copy=False)
        return self._validated(start, energy, voxels)


def open_hdf5(path: str, geometry: Geometry | None) -> Source:
    """Open an HDF5 shower file; its keys tell CaloGAN from CaloChallenge layout."""
    with open(path, "rb") as fh:
        if fh.read(8) != _HDF5_SIGNATURE:
            raise CalodistillError(f"{path}: not an HDF5 file (bad signature; truncated or corrupt)")
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
