"""Sampling calorimeters for the GFLASH generator: materials, the effective medium and each geometry's preset.

Material constants are PDG values (Atomic and nuclear properties of materials: X0, E_c, R_M, dE/dx_min);
the presets (:func:`calorimeter_for`) follow the detectors the geometries come from. A geometry file's
``material`` (:class:`~.geometry.Medium`) gives an :class:`EffectiveCalorimeter` instead.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..errors import CalodistillError
from .geometry import Geometry, Medium, get_geometry

__all__ = ["EffectiveCalorimeter", "Material", "SamplingCalorimeter", "calorimeter_for"]

_ES_MEV = 21.2  # multiple-scattering energy scale E_s


@dataclass(frozen=True)
class Material:
    """A calorimeter material (PDG values).

    Args:
        name: label.
        Z: atomic number (effective for compounds).
        A: mass number, g/mol.
        density: g/cm³.
        x0_mm: radiation length, mm.
        critical_energy: E_c (electrons), MeV.
        moliere_mm: Molière radius, mm.
        dedx_mip: minimum ionisation dE/dx, MeV cm²/g (sampling fraction of a mip).
    """

    name: str
    Z: float
    A: float
    density: float
    x0_mm: float
    critical_energy: float
    moliere_mm: float
    dedx_mip: float

    @property
    def x0_mass(self) -> float:
        """Radiation length in g/cm²."""
        return self.x0_mm / 10.0 * self.density


LEAD = Material("Pb", 82, 207.2, 11.35, 5.612, 7.43, 16.02, 1.122)
LIQUID_ARGON = Material("LAr", 18, 39.948, 1.396, 140.0, 32.84, 90.43, 1.519)
TUNGSTEN = Material("W", 74, 183.84, 19.30, 3.504, 7.97, 9.327, 1.145)
SILICON = Material("Si", 14, 28.0855, 2.329, 93.70, 40.19, 48.82, 1.664)


@dataclass(frozen=True)
class SamplingCalorimeter:
    """A sampling calorimeter of two materials, read out in depth segments.

    GFLASH replaces the two materials by an effective medium with mass-weighted ``Z_eff``, ``X0_eff``,
    ``E_c,eff`` and ``R_M,eff``; ``F_S = X0_eff / (d_abs + d_act)`` and
    ``ê = e/mip = 1 / (1 + 0.007 (Z_abs − Z_act))``. Readout:

    - ``"total"``: every deposit in absorber and active layers is recorded (the CaloGAN Geant4 files do
      this: sum of cells / incident energy ≈ 0.99): homogeneous-medium profiles in the effective medium,
      no sampling fluctuations.
    - ``"calibrated"``: visible energy divided by the mean sampling fraction (ATLAS-like cell energies,
      the CaloChallenge dataset-1 convention); sampling-calorimeter profiles and fluctuations.
    - ``"visible"``: energy in the active layers only (``f_S = ê · f_mip`` of the deposit); the Si-W
      dataset-2 preset.

    Args:
        absorber: passive material.
        active: sensitive material.
        d_absorber: absorber thickness per sampling cell, mm.
        d_active: active thickness per sampling cell, mm.
        segments_x0: per geometry layer, the readout depth interval ``(t_start, t_end)`` in ``X0_eff`` from
            the front face (in the geometry's layer order).
        readout: ``"total"``, ``"calibrated"`` or ``"visible"`` (above).
        sampling_term: ``c_S`` of ``σ/E = c_S/√(E/GeV)``; ignored for ``"total"`` readout.
        max_slice_x0: longest depth slice over which the radial profile is taken as constant.
        spot_scale: multiplies the GFLASH number of spots (1 = the published formula).
    """

    absorber: Material
    active: Material
    d_absorber: float
    d_active: float
    segments_x0: tuple[tuple[float, float], ...]
    readout: str = "calibrated"
    sampling_term: float = 0.11
    max_slice_x0: float = 1.0
    spot_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.readout not in ("total", "calibrated", "visible"):
            raise CalodistillError(f"calorimeter: unknown readout {self.readout!r}")
        if self.d_absorber <= 0 or self.d_active <= 0:
            raise CalodistillError("calorimeter: layer thicknesses must be positive")
        for a, b in self.segments_x0:
            if not 0 <= a < b:
                raise CalodistillError(f"calorimeter: bad depth segment ({a}, {b})")

    @functools.cached_property
    def _mix(self) -> dict[str, float]:
        m1, m2, d1, d2 = self.absorber, self.active, self.d_absorber, self.d_active
        mass = d1 * m1.density + d2 * m2.density
        w1, w2 = d1 * m1.density / mass, d2 * m2.density / mass
        rho = mass / (d1 + d2)
        inv_x0_mass = w1 / m1.x0_mass + w2 / m2.x0_mass
        x0_mass = 1.0 / inv_x0_mass
        # energy loss per unit mass of the mixture, in units of E_c/X0 (MeV per g/cm²)
        ec_over_x0 = w1 * m1.critical_energy / m1.x0_mass + w2 * m2.critical_energy / m2.x0_mass
        dep1 = d1 * m1.density * m1.dedx_mip
        dep2 = d2 * m2.density * m2.dedx_mip
        return {
            "Z": w1 * m1.Z + w2 * m2.Z,
            "A": w1 * m1.A + w2 * m2.A,
            "density": rho,
            "x0_mm": x0_mass / rho * 10.0,
            "critical_energy": x0_mass * ec_over_x0,
            "moliere_mm": _ES_MEV / ec_over_x0 / rho * 10.0,
            "f_mip": dep2 / (dep1 + dep2),
        }

    @property
    def z_eff(self) -> float:
        return self._mix["Z"]

    @property
    def x0_eff_mm(self) -> float:
        return self._mix["x0_mm"]

    @property
    def critical_energy_eff(self) -> float:
        """Effective critical energy, MeV."""
        return self._mix["critical_energy"]

    @property
    def moliere_eff_mm(self) -> float:
        return self._mix["moliere_mm"]

    @property
    def f_s(self) -> float:
        """GFLASH ``F_S = X0_eff / (d_abs + d_act)``."""
        return self.x0_eff_mm / (self.d_absorber + self.d_active)

    @property
    def e_hat(self) -> float:
        """GFLASH ``ê = e/mip = 1 / (1 + 0.007 (Z_abs − Z_act))``."""
        return 1.0 / (1.0 + 0.007 * (self.absorber.Z - self.active.Z))

    @property
    def sampling_fraction(self) -> float:
        """Mean fraction of an EM shower's energy deposited in the active layers (``ê · f_mip``)."""
        return self.e_hat * self._mix["f_mip"]

    @property
    def x0_per_cell(self) -> float:
        """Radiation lengths per sampling cell (absorber + active)."""
        return self.d_absorber / self.absorber.x0_mm + self.d_active / self.active.x0_mm


@dataclass(frozen=True)
class EffectiveCalorimeter:
    """A detector given directly by its effective medium (a geometry file's ``material``).

    It offers what GFLASH reads from a :class:`SamplingCalorimeter`. A homogeneous detector
    (``sampling_fraction`` 1) has ``"total"`` readout; otherwise the visible energy is read
    (``"visible"``), with sampling fluctuations ``c_S`` = ``sampling_term``. Without the two materials
    GFLASH's sampling corrections of the profile means are not defined: they are left out (``ê`` = 1,
    ``1/F_S`` = 0), so the profiles are those of the effective medium.

    Args:
        medium: the declared medium and layer depths.
        max_slice_x0: longest depth slice over which the radial profile is taken as constant.
        spot_scale: multiplies the GFLASH number of spots.
    """

    medium: Medium
    max_slice_x0: float = 1.0
    spot_scale: float = 1.0

    @property
    def segments_x0(self) -> tuple[tuple[float, float], ...]:
        x0 = self.medium.x0_mm
        return tuple((a / x0, b / x0) for a, b in self.medium.segments_mm)

    @property
    def readout(self) -> str:
        return "total" if self.medium.sampling_fraction >= 1.0 else "visible"

    @property
    def sampling_term(self) -> float:
        return self.medium.sampling_term

    @property
    def z_eff(self) -> float:
        return self.medium.z

    @property
    def x0_eff_mm(self) -> float:
        return self.medium.x0_mm

    @property
    def critical_energy_eff(self) -> float:
        return self.medium.critical_energy_mev

    @property
    def moliere_eff_mm(self) -> float:
        return self.medium.moliere_mm

    @property
    def f_s(self) -> float:
        return float("inf")

    @property
    def e_hat(self) -> float:
        return 1.0

    @property
    def sampling_fraction(self) -> float:
        return self.medium.sampling_fraction


def _calogan_calorimeter() -> SamplingCalorimeter:
    x0 = SamplingCalorimeter(LEAD, LIQUID_ARGON, 2.0, 4.0, ((0.0, 1.0),)).x0_eff_mm
    bounds = np.cumsum([0.0, 90.0, 347.0, 43.0]) / x0
    segs = tuple((float(a), float(b)) for a, b in zip(bounds[:-1], bounds[1:]))
    # spot_scale: Geant4 records every charged step, far more (and smaller) deposits than GFLASH's spots;
    # 5x the published spot count reproduces the occupancy of the CaloGAN Geant4 files (tests/pipeline/data/test_gflash.py)
    return SamplingCalorimeter(LEAD, LIQUID_ARGON, 2.0, 4.0, segs, readout="total", sampling_term=0.0,
                               spot_scale=5.0)


_ATLAS_DEPTHS_X0 = {
    0: (1.7, 2.0), 1: (2.0, 6.3), 2: (6.3, 22.3), 3: (22.3, 24.3),
    12: (26.0, 70.0), 13: (70.0, 190.0), 14: (190.0, 250.0),
}


def _atlas_calorimeter(geometry: Geometry) -> SamplingCalorimeter:
    segs = tuple(_ATLAS_DEPTHS_X0[layer.index] for layer in geometry.layers)
    return SamplingCalorimeter(LEAD, LIQUID_ARGON, 1.53, 4.2, segs, readout="calibrated", sampling_term=0.10)


def _siw_calorimeter(geometry: Geometry) -> SamplingCalorimeter:
    probe = SamplingCalorimeter(TUNGSTEN, SILICON, 1.4, 0.3, ((0.0, 1.0),))
    per_layer = 2.0 * probe.x0_per_cell  # two W+Si cells per readout layer: 0.806 X0
    segs = tuple((i * per_layer, (i + 1) * per_layer) for i in range(geometry.n_layers))
    return SamplingCalorimeter(TUNGSTEN, SILICON, 1.4, 0.3, segs, readout="visible", sampling_term=0.17)


def calorimeter_for(geometry: Geometry | str) -> SamplingCalorimeter | EffectiveCalorimeter:
    """The calorimeter of a geometry: its declared medium (geometry files), else the preset of a registered one.

    Depths are in ``X0_eff`` from the front face; gaps between segments are dead material whose energy
    is lost.

    - ``calogan``: 2 mm Pb + 4 mm LAr (0.385 X0 per 6 mm, ``X0_eff`` = 15.6 mm), readout segments 90, 347
      and 43 mm (5.8, 22.3 and 2.8 X0), total readout (hep-lbdl/CaloGAN DetectorConstruction).
    - ``calochallenge-1-photons`` / ``-1-pions`` (ATLAS barrel at |η| ≈ 0.2; ATLAS LAr TDR and the ATLAS
      detector paper, JINST 3 S08003): 1.53 mm Pb + 4.2 mm LAr accordion; 1.7 X0 of inner detector,
      solenoid and cryostat in front (dead), presampler layer 0 = 1.7–2.0 X0, strips layer 1 = 2.0–6.3 X0,
      middle layer 2 = 6.3–22.3 X0, back layer 3 = 22.3–24.3 X0, cryostat 24.3–26.0 X0 (dead), Tile A /
      BC / D (layers 12 / 13 / 14) = 26–70 / 70–190 / 190–250 X0 (≈1.5 / 4.1 / 1.8 λ of iron-scintillator).
      Only EM showers are modelled: on the pion geometry the tile layers collect leakage. Calibrated
      readout, sampling term 10 %.
    - ``calochallenge-2`` / ``-3``: each readout layer is 2 × (1.4 mm W + 0.3 mm Si) = 0.806 X0 (45 layers
      = 36.3 X0); visible (silicon) readout, sampling term 17 % (CALICE Si-W ECAL).
    """
    geo = get_geometry(geometry)
    if geo.medium is not None:
        return EffectiveCalorimeter(geo.medium)
    if geo.name == "calogan":
        return _calogan_calorimeter()
    if geo.name.startswith("calochallenge-1"):
        return _atlas_calorimeter(geo)
    if geo.name in ("calochallenge-2", "calochallenge-3"):
        return _siw_calorimeter(geo)
    where = f" ({geo.origin})" if geo.origin else ""
    raise CalodistillError(f"synth: geometry {geo.name!r}{where} declares no material: add a 'material' section "
                           "(x0_mm, moliere_mm, critical_energy_mev, ...) and each layer's thickness_mm")
