"""The GFLASH physics (pipeline/data/gflash.py, calorimeter.py): units, profiles, exact cell integrals,
sampling fluctuations, and the CaloGAN preset against the Geant4 CaloGAN file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import integrate

from calodistill.pipeline.data.calorimeter import calorimeter_for
from calodistill.pipeline.data.geometry import get_geometry
from calodistill.pipeline.data.gflash import _cartesian_fractions, _corner, _polar_fractions, simulate
from calodistill.pipeline.data.synth import LADDER_ENERGIES_MEV, SynthSpec, generate_chunk

GEOMETRIES = ["calogan", "calochallenge-1-photons", "calochallenge-1-pions", "calochallenge-2"]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_shapes_units_non_negative(geometry: str) -> None:
    n = 50 if geometry == "calochallenge-2" else 200
    spec = SynthSpec(geometry, n, seed=1, spectrum="ladder", chunk_size=n)
    s = generate_chunk(spec, 0)
    geo = get_geometry(geometry)
    assert s.voxels.shape == (n, geo.n_voxels) and s.voxels.dtype == np.float32
    assert s.incident_energy.dtype == np.float64
    assert set(np.unique(s.incident_energy)) <= set(LADDER_ENERGIES_MEV.tolist())  # MeV
    assert np.all(np.isfinite(s.voxels)) and np.all(s.voxels >= 0)
    response = s.voxels.sum(axis=1, dtype=np.float64) / s.incident_energy
    calo = calorimeter_for(geometry)
    expected = calo.sampling_fraction if calo.readout == "visible" else 1.0
    # containment: most of the energy is seen, never (much) more than the incident energy
    assert 0.7 * expected < np.median(response) < 1.05 * expected
    assert np.all(s.particle == "e+")


def test_shower_maximum_moves_deeper_with_energy_and_for_photons() -> None:
    geo = get_geometry("calochallenge-2")
    rng = np.random.default_rng(0)
    depth = np.arange(geo.n_layers)

    def mean_depth(e_mev: float, particle: str) -> float:
        v = simulate(geo, np.full(60, e_mev), particle, rng)
        le = geo.layer_energies(v.astype(np.float64))
        return float(((le * depth).sum(1) / le.sum(1)).mean())

    d1, d100 = mean_depth(1000.0, "e-"), mean_depth(100_000.0, "e-")
    # GFLASH: T ≈ ln(E/E_c) − 0.8 (X0); ln(100) ≈ 4.6 X0 ≈ 5.7 readout layers of 0.8 X0
    assert 4.0 < d100 - d1 < 7.5
    assert mean_depth(10_000.0, "gamma") > mean_depth(10_000.0, "e+") + 0.5


def test_corner_integral_and_radial_tables_are_exact() -> None:
    r, x, y = 1.3, 0.7, 2.1
    num = integrate.dblquad(lambda v, u: r**2 / (np.pi * (u * u + v * v + r * r) ** 2), 0, x, 0, y)[0]
    assert _corner(np.array(x), np.array(y), np.array(r)) == pytest.approx(num, rel=1e-9)
    geo = get_geometry("calogan")
    radii = np.array([1.0, 30.0, 1e4])
    frac = _cartesian_fractions(geo.layers[1], radii)
    # a unit profile: almost all inside 480 mm for small radii; F(outside r=R) = R²/(R²+r²) bounds the loss
    assert frac[0].sum() == pytest.approx(1.0, abs=1e-4)
    assert 1 - 30.0**2 / (30.0**2 + 240**2) <= frac[1].sum() <= 1.0
    assert frac[2].sum() < 0.01
    polar = get_geometry("calochallenge-1-photons").layers[1]
    pf = _polar_fractions(polar, np.array([5.0]))
    rmax = polar.edges1[-1]
    assert pf.sum() == pytest.approx(rmax**2 / (rmax**2 + 25.0))
    np.testing.assert_allclose(pf.reshape(polar.shape)[0], pf.reshape(polar.shape)[3])  # azimuthal symmetry


def test_sampling_fluctuations_widen_resolution() -> None:
    geo = get_geometry("calochallenge-1-photons")
    calo = calorimeter_for(geo)
    e = np.full(400, 10_000.0)
    wide = simulate(geo, e, "e+", np.random.default_rng(0), calo).sum(1) / 1e4
    narrow = simulate(geo, e, "e+", np.random.default_rng(0), dataclasses.replace(calo, sampling_term=0.0)).sum(1) / 1e4
    assert wide.std() > narrow.std()
    assert abs(wide.mean() - narrow.mean()) < 0.01  # sampling is unbiased
    # c_S / sqrt(E) = 0.10 / sqrt(10): the stochastic term dominates the spread
    assert 0.02 < wide.std() < 0.05


# ---------------------------------------------------------------------------- realism vs Geant4 CaloGAN


def _stats(e_mev: np.ndarray, layers: list[np.ndarray]) -> tuple[np.ndarray, float, np.ndarray]:
    n = len(e_mev)
    le = np.stack([l.reshape(n, -1).sum(1) for l in layers], axis=1)
    tot = le.sum(1)
    frac = (le / tot[:, None]).mean(0)
    nonzero = np.array([(l.reshape(n, -1) > 0).mean() for l in layers])
    return frac, float((tot / e_mev).mean()), nonzero


def test_calogan_preset_matches_geant4(calogan_real_file: Path) -> None:
    with h5py.File(calogan_real_file, "r") as f:
        e_real = f["energy"][:, 0] * 1000.0
        real = [f[f"layer_{i}"][:] for i in range(3)]
    frac_r, resp_r, nz_r = _stats(e_real, real)
    assert frac_r == pytest.approx([0.193, 0.806, 0.002], abs=2e-3)  # the numbers the issue quotes
    s = generate_chunk(SynthSpec("calogan", 3000, seed=11, chunk_size=3000), 0)  # same 1–100 GeV spectrum
    frac_s, resp_s, nz_s = _stats(s.incident_energy, s.geometry.split_layers(s.voxels))
    np.testing.assert_allclose(frac_s, frac_r, atol=0.05)
    assert resp_s == pytest.approx(resp_r, abs=0.01)
    np.testing.assert_allclose(nz_s, nz_r, atol=0.12)
    # the shower core: the two central strips of layer 0 hold most of its energy in both
    l0_r = real[0].sum(0).sum(0)
    l0_s = s.geometry.split_layers(s.voxels)[0].sum(0).sum(0)
    assert (l0_s[47:49].sum() / l0_s.sum()) == pytest.approx(l0_r[47:49].sum() / l0_r.sum(), abs=0.08)
