"""The in-memory shower container every reader, writer and generator exchanges.

Units: MeV everywhere inside calodistill (readers convert on the way in, writers on the way out).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import CalodistillError
from .geometry import Geometry

__all__ = ["Showers"]


@dataclass
class Showers:
    """A batch of showers on one geometry.

    Args:
        geometry: the readout geometry; ``voxels.shape[1] == geometry.n_voxels``.
        incident_energy: ``(N,)`` float64, MeV.
        voxels: ``(N, n_voxels)`` float32, MeV, in the geometry's voxel order.
        particle: ``(N,)`` array of particle names (``"e+"``, ``"gamma"``, ``"pi+"`` ...).
        event_id: ``(N,)`` int64, unique within a dataset.
    """

    geometry: Geometry
    incident_energy: np.ndarray
    voxels: np.ndarray
    particle: np.ndarray = field(default=None)  # type: ignore[assignment]
    event_id: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.incident_energy = np.asarray(self.incident_energy, dtype=np.float64).reshape(-1)
        self.voxels = np.asarray(self.voxels, dtype=np.float32)
        n = len(self.incident_energy)
        if self.voxels.ndim != 2 or self.voxels.shape[0] != n:
            raise CalodistillError(
                f"showers: voxels of shape {self.voxels.shape} do not match {n} incident energies"
            )
        if self.voxels.shape[1] != self.geometry.n_voxels:
            raise CalodistillError(
                f"showers: {self.voxels.shape[1]} voxels per shower, geometry {self.geometry.name} has {self.geometry.n_voxels}"
            )
        if self.particle is None:
            self.particle = np.full(n, self.geometry.particle or "unknown", dtype=object)
        elif np.ndim(self.particle) == 0:
            self.particle = np.full(n, str(self.particle), dtype=object)
        else:
            self.particle = np.asarray(self.particle, dtype=object)
        if self.event_id is None:
            self.event_id = np.arange(n, dtype=np.int64)
        else:
            self.event_id = np.asarray(self.event_id, dtype=np.int64)
        if len(self.particle) != n or len(self.event_id) != n:
            raise CalodistillError("showers: particle / event_id lengths do not match the number of showers")

    def __len__(self) -> int:
        return len(self.incident_energy)

    @property
    def layer_energies(self) -> np.ndarray:
        """``(N, n_layers)`` float64 energy per layer, MeV."""
        return self.geometry.layer_energies(self.voxels.astype(np.float64))

    def subset(self, index: np.ndarray | slice) -> "Showers":
        """The showers selected by ``index`` (a slice, integer or boolean array)."""
        return Showers(
            self.geometry,
            self.incident_energy[index],
            self.voxels[index],
            self.particle[index],
            self.event_id[index],
        )

    @staticmethod
    def concatenate(parts: list["Showers"]) -> "Showers":
        """Join batches on the same geometry."""
        if not parts:
            raise CalodistillError("showers: nothing to concatenate")
        geo = parts[0].geometry
        if any(p.geometry.name != geo.name for p in parts):
            raise CalodistillError("showers: cannot concatenate showers of different geometries")
        return Showers(
            geo,
            np.concatenate([p.incident_energy for p in parts]),
            np.concatenate([p.voxels for p in parts]),
            np.concatenate([p.particle for p in parts]),
            np.concatenate([p.event_id for p in parts]),
        )
