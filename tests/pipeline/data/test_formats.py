"""Reading and writing shower files through the front door (pipeline/data/formats.py): the real CaloGAN
file, round trips in every format, the format chosen by extension, atomic writes.

``make_showers`` and ``assert_same`` are shared by the other data tests.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest

from calodistill.pipeline.data.formats import read_showers, write_showers
from calodistill.pipeline.data.geometry import get_geometry
from calodistill.pipeline.data.showers import Showers
from calodistill.pipeline.errors import CalodistillError


def make_showers(geometry: str, n: int, seed: int = 0) -> Showers:
    """Sparse, positive, float32-exact toy showers (not physics; for format tests only)."""
    rng = np.random.default_rng(seed)
    geo = get_geometry(geometry)
    voxels = rng.exponential(50.0, size=(n, geo.n_voxels)).astype(np.float32)
    voxels[rng.random(voxels.shape) < 0.6] = 0.0
    energy = rng.uniform(1e3, 1e5, size=n)
    return Showers(geo, energy, voxels, np.full(n, "gamma", dtype=object), np.arange(n, dtype=np.int64) + 7)


def assert_same(a: Showers, b: Showers, energy_exact: bool = True) -> None:
    assert a.geometry.name == b.geometry.name
    np.testing.assert_array_equal(a.voxels, b.voxels)
    if energy_exact:
        np.testing.assert_array_equal(a.incident_energy, b.incident_energy)
    else:
        np.testing.assert_allclose(a.incident_energy, b.incident_energy, rtol=1e-15)


# ------------------------------------------------------------------------------------------ real data
def test_read_real_calogan(calogan_real_file: Path) -> None:
    s = read_showers(calogan_real_file)
    assert len(s) == 51 and s.geometry.name == "calogan" and s.voxels.shape == (51, 504)
    assert s.incident_energy.min() >= 1e3 and s.incident_energy.max() <= 1e5  # 1–100 GeV, now MeV
    assert 0.97 < float(np.mean(s.voxels.sum(axis=1) / s.incident_energy)) < 1.01
    assert set(s.particle) == {"e+"} and list(s.event_id) == list(range(51))
    with h5py.File(calogan_real_file) as f:
        for i, layer in enumerate(s.geometry.split_layers(s.voxels)):
            np.testing.assert_array_equal(layer, f[f"layer_{i}"][:].astype(np.float32))
        np.testing.assert_array_equal(s.incident_energy, f["energy"][:, 0] * 1000.0)


def test_real_calogan_round_trips(calogan_real_file: Path, tmp_path: Path) -> None:
    s = read_showers(calogan_real_file)
    for name in ("a.parquet", "a.h5", "a.csv"):
        back = read_showers(write_showers(s, tmp_path / name))
        assert_same(s, back, energy_exact=name != "a.h5")
        np.testing.assert_array_equal(back.event_id, s.event_id)
        assert list(back.particle) == list(s.particle)
    with h5py.File(tmp_path / "a.h5") as f:  # CaloGAN layout, GeV
        assert f["energy"].shape == (51, 1) and f["layer_1"].shape == (51, 12, 12) and f["overflow"].shape == (51, 3)
        np.testing.assert_allclose(f["energy"][:, 0], s.incident_energy / 1000.0)


# ------------------------------------------------------------------------------------------ writing
def test_calogan_layout_is_native_and_explicit_format(tmp_path: Path) -> None:
    s = make_showers("calogan", 5)
    write_showers(s, tmp_path / "flat.h5", fmt="calochallenge")
    with h5py.File(tmp_path / "flat.h5") as f:
        assert set(f) == {"incident_energies", "showers"}
    assert_same(s, read_showers(tmp_path / "flat.h5"))
    with pytest.raises(CalodistillError, match="CaloGAN layout needs the calogan geometry"):
        write_showers(make_showers("calochallenge-1-photons", 2), tmp_path / "x.h5", fmt="calogan")
    with pytest.raises(CalodistillError, match="unknown output type '.txt'"):
        write_showers(s, tmp_path / "x.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.h5"]  # nothing half-written left


def test_write_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_showers("calogan", 3)
    target = write_showers(s, tmp_path / "s.parquet")
    before = target.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(pq, "write_table", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        write_showers(make_showers("calogan", 4, seed=1), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]


def test_calogan_energy_quoted_in_gev_and_directory_output_refused(tmp_path: Path) -> None:
    """The CaloGAN layout stores incident energies in GeV: a bad one is quoted in GeV, as a plain number."""
    path = write_showers(make_showers("calogan", 4), tmp_path / "cg.h5")
    with h5py.File(path, "r+") as f:
        f["energy"][2, 0] = -10.0
    with pytest.raises(CalodistillError, match=r"cg.h5: non-positive incident energy -10 GeV in row 2$"):
        read_showers(path)
    with pytest.raises(CalodistillError, match=r"is a directory; give a file name ending in .h5/.hdf5, .parquet"):
        write_showers(make_showers("calogan", 2), tmp_path)
    with pytest.raises(CalodistillError, match=r"noext: no file extension \(use .h5/.hdf5"):
        write_showers(make_showers("calogan", 2), tmp_path / "noext")
