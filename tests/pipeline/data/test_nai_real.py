"""The real GEARS NaI showers (../shared/data/real/em-shower-nai-gears) through the documented example files
(examples/nai-gears/geometry.yaml, columns.yaml): ROOT and its HDF5 export ingest to the same 1000 rows, and
the per-layer mean energy fractions equal the ones computed from the ROOT file directly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from calodistill.pipeline.data.dataset import open_dataset
from calodistill.pipeline.data.ingest import ingest_showers

REPO = Path(__file__).resolve().parents[3]
EXAMPLE = REPO / "examples" / "nai-gears"


@pytest.fixture(scope="module")
def nai_dir(shared_dir: Path) -> Path:
    path = shared_dir / "data" / "real" / "em-shower-nai-gears"
    if not (path / "data_MVA.root").is_file():
        pytest.skip("em-shower-nai-gears is not present")
    return path


@pytest.fixture(scope="module")
def root_fractions(nai_dir: Path) -> np.ndarray:
    """Mean over events of E_layer / E_total, straight from the ROOT file (log10 keV, -5 = empty)."""
    uproot = pytest.importorskip("uproot")
    with uproot.open(nai_dir / "data_MVA.root") as f:
        shower = f["h"]["shower"].array(library="np")
    energy = np.where(shower <= -5.0, 0.0, 10.0**shower)[..., 0]  # (1000, 12, 12, 12) keV
    layers = energy.sum(axis=(2, 3))
    return (layers / layers.sum(axis=1, keepdims=True)).mean(axis=0)


@pytest.mark.parametrize("name", ["data_MVA.root", "data_MVA.root:h", "data_MVA.h5"])
def test_nai_ingests_exactly_with_the_root_file_s_layer_fractions(nai_dir: Path, root_fractions: np.ndarray,
                                                                  tmp_path: Path, name: str) -> None:
    if name.endswith(".root"):
        pytest.importorskip("uproot")
    summary = ingest_showers([str(nai_dir / name)], tmp_path / "nai", geometry=str(EXAMPLE / "geometry.yaml"),
                             columns=str(EXAMPLE / "columns.yaml"), scheduler="synchronous", progress=False)
    assert summary["n_showers"] == 1000 and summary["geometry"] == "nai-gears"
    ds = open_dataset(tmp_path / "nai")
    showers = ds.load()
    assert len(showers) == 1000 and showers.geometry.n_voxels == 12 * 12 * 12
    assert ds.geometry.medium is not None  # the material travels with the data (synth, later commands)
    le = showers.layer_energies
    fractions = (le / le.sum(axis=1, keepdims=True)).mean(axis=0)
    np.testing.assert_allclose(fractions, root_fractions, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(fractions[:3], [0.051, 0.187, 0.250], atol=5e-4)  # SOURCE.txt
    np.testing.assert_allclose(showers.incident_energy, 2000.0, rtol=2e-4)  # 2 GeV, en_in in keV
    particles, counts = np.unique(showers.particle.astype(str), return_counts=True)
    assert dict(zip(particles, counts.tolist())) == {"gamma": 327, "e-": 354, "e+": 319}
    response = showers.voxels.sum(axis=1, dtype=np.float64) / showers.incident_energy
    assert response.mean() == pytest.approx(0.737, abs=0.002)
