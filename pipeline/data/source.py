"""A shower file opened for chunked reading: the :class:`Source` every reader returns.

A source holds no open file handle, so it can be shipped to Dask workers; each ``read`` opens the file,
reads one row range and validates it. Errors are one-line :class:`CalodistillError` messages
``"<file>: <problem>"``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import CalodistillError
from .geometry import Geometry, get_geometry
from .showers import Showers

__all__ = ["GEV", "Source", "file_sha256", "format_energy", "one_line", "resolve_geometry", "validate_arrays"]

GEV = 1000.0  # MeV per GeV


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


def one_line(exc: BaseException) -> str:
    """A library exception's message on one line, at most 160 characters (for our error messages)."""
    return " ".join(str(exc).split())[:160]


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

    def _validated(
        self,
        start: int,
        incident: np.ndarray,
        voxels: np.ndarray,
        particle: Any = None,
        event_id: np.ndarray | None = None,
        energy_unit: str = "MeV",
    ) -> Showers:
        """Validated showers from the arrays a subclass read (in MeV); ids default to row numbers.

        ``energy_unit`` is the unit the file stores incident energies in: error messages quote them in it.
        """
        validate_arrays(self.path, incident, voxels, row_offset=start, energy_unit=energy_unit)
        if event_id is None:
            event_id = np.arange(start, start + len(incident), dtype=np.int64)
        if particle is None:
            particle = self.geometry.particle or "unknown"
        return Showers(self.geometry, incident, voxels, particle, event_id)


def format_energy(value: float, unit: str = "MeV") -> str:
    """An energy as a plain number with its unit (``-10 GeV``), not ``np.float64(-10.0)``."""
    return f"{float(value):.6g} {unit}"


def validate_arrays(path: str, incident: np.ndarray, voxels: np.ndarray, row_offset: int = 0,
                    energy_unit: str = "MeV") -> None:
    """Raise a one-line :class:`CalodistillError` for non-finite or negative energies (``path`` names the file).

    Energies are given in MeV; a bad incident energy is quoted in ``energy_unit``, the file's own unit.
    """
    from .columns import UNITS_MEV

    if len(incident) != len(voxels):
        raise CalodistillError(f"{path}: {len(incident)} incident energies but {len(voxels)} showers")
    bad = ~np.isfinite(incident)
    if bad.any():
        raise CalodistillError(f"{path}: non-finite incident energy (NaN/inf) in row {row_offset + int(np.argmax(bad))}")
    bad = incident <= 0
    if bad.any():
        i = int(np.argmax(bad))
        unit = energy_unit if energy_unit in UNITS_MEV else "MeV"
        shown = format_energy(incident[i] / UNITS_MEV[unit], unit)
        raise CalodistillError(f"{path}: non-positive incident energy {shown} in row {row_offset + i}")
    finite = np.isfinite(voxels)
    if not finite.all():
        i = int(np.argmax(~finite.all(axis=1)))
        raise CalodistillError(f"{path}: non-finite voxel energy (NaN/inf) in row {row_offset + i}")
    negative = voxels < 0
    if negative.any():
        i = int(np.argmax(negative.any(axis=1)))
        raise CalodistillError(
            f"{path}: negative voxel energy {format_energy(voxels[i][voxels[i] < 0].min())} in row {row_offset + i}"
        )
