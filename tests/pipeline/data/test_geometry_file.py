"""Geometry files (pipeline/data/geometry_file.py): YAML specs and binning XML paths wherever a geometry is
accepted, their round trip through a geometry record, synth on their material, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calodistill.pipeline.data.geometry import Geometry, get_geometry
from calodistill.pipeline.data.synth import SynthSpec, generate_showers, open_synth_source
from calodistill.pipeline.errors import CalodistillError

REPO = Path(__file__).resolve().parents[3]
NAI = REPO / "examples" / "nai-gears" / "geometry.yaml"

CARTESIAN = """
name: tiny-cart
particle: e-
layers:
  - {nx: 4, ny: 3, cell_mm: [5, 10], thickness_mm: 20}
  - {nx: 2, ny: 2, cell_x_mm: 10, cell_y_mm: 15, thickness_mm: 40, gap_mm: 5, repeat: 2}
material: {x0_mm: 10, moliere_mm: 20, critical_energy_mev: 10, sampling_fraction: 0.2, front_mm: 3}
"""
POLAR = """
layers:
  - {r_edges: [0, 5, 10, 30], n_alpha: 8, thickness_mm: 30}
  - {r_edges: [0, 20, 60], n_alpha: 1, thickness_mm: 30, index: 7}
material: {x0_mm: 15.6, moliere_mm: 42, critical_energy_mev: 8}
"""


def _write(tmp_path: Path, text: str, name: str = "geo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cartesian_spec(tmp_path: Path) -> None:
    geo = get_geometry(_write(tmp_path, CARTESIAN))
    assert geo.name == "tiny-cart" and geo.particle == "e-"
    assert [layer.shape for layer in geo.layers] == [(3, 4), (2, 2), (2, 2)]
    assert [layer.index for layer in geo.layers] == [0, 1, 2]
    first = geo.layers[0]
    assert first.kind == "cartesian" and first.edges1 == (-10.0, -5.0, 0.0, 5.0, 10.0)  # x: 4 cells of 5 mm
    assert first.edges0 == (-15.0, -5.0, 5.0, 15.0)  # y: 3 cells of 10 mm, centred
    assert geo.layers[1].edges0 == (-15.0, 0.0, 15.0)
    # depth: 3 mm dead in front, 20 mm, then 5 mm gap + 40 mm, twice
    assert geo.medium.segments_mm == ((3.0, 23.0), (28.0, 68.0), (73.0, 113.0))
    assert geo.medium.sampling_fraction == 0.2 and geo.medium.sampling_term == 0.1
    assert geo.medium.z == pytest.approx(610.0 / 10.0 - 1.24)  # from E_c when z is not given


def test_polar_spec_and_name_from_the_file(tmp_path: Path) -> None:
    geo = get_geometry(_write(tmp_path, POLAR, "my-polar.yaml"))
    assert geo.name == "my-polar" and geo.n_voxels == 8 * 3 + 1 * 2
    assert [layer.index for layer in geo.layers] == [0, 7]
    assert all(layer.kind == "polar" for layer in geo.layers)
    assert geo.layers[0].edges1 == (0.0, 5.0, 10.0, 30.0)
    np.testing.assert_allclose(geo.layers[0].edges0, np.linspace(-np.pi, np.pi, 9))


def test_record_round_trip_and_same_cells(tmp_path: Path) -> None:
    geo = get_geometry(_write(tmp_path, CARTESIAN))
    back = Geometry.from_dict(json.loads(json.dumps(geo.to_dict())))
    assert back == geo and back.same_cells(geo) and back.medium == geo.medium
    assert Geometry.from_dict(get_geometry("calogan").to_dict()) is get_geometry("calogan")
    assert not geo.same_cells(get_geometry("calogan"))
    assert "tiny-cart" in geo.describe() and "16 voxels" not in geo.describe()


def test_binning_xml_path_is_a_geometry(tmp_path: Path) -> None:
    from importlib import resources

    text = resources.files("calodistill.pipeline.data").joinpath("binning", "binning_dataset_1_photons.xml").read_text()
    geo = get_geometry(_write(tmp_path, text, "binning_photons.xml"))
    preset = get_geometry("calochallenge-1-photons")
    assert geo.name == "binning_photons" and geo.same_cells(preset) and geo.n_voxels == 368


def test_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = _write(tmp_path, CARTESIAN)
    assert get_geometry(path).n_voxels == 12 + 4 + 4
    path.write_text(CARTESIAN.replace("nx: 4, ny: 3", "nx: 5, ny: 3"))
    assert get_geometry(str(path)).n_voxels == 15 + 4 + 4


def test_synth_on_declared_cartesian_and_polar_geometries(tmp_path: Path) -> None:
    for text in (CARTESIAN, POLAR):
        path = _write(tmp_path, text)
        showers = generate_showers(SynthSpec(str(path), 40, seed=2, energy=10.0))
        assert showers.voxels.shape == (40, get_geometry(path).n_voxels)
        assert np.all(showers.voxels >= 0) and showers.voxels.sum() > 0
        again = generate_showers(SynthSpec(str(path), 40, seed=2, energy=10.0))
        assert np.array_equal(again.voxels, showers.voxels)  # deterministic for a seed
    # a sampling calorimeter reads its visible fraction: about 0.2 of a contained shower
    showers = generate_showers(SynthSpec(str(_write(tmp_path, CARTESIAN)), 200, seed=1, energy=1.0))
    assert 0.05 < showers.voxels.sum() / showers.incident_energy.sum() < 0.2


def test_synth_on_the_nai_example_has_the_data_s_longitudinal_profile() -> None:
    showers = generate_showers(SynthSpec(str(NAI), 200, seed=1, particle="gamma", energy=2.0))
    le = showers.layer_energies
    frac = (le / le.sum(axis=1, keepdims=True)).mean(axis=0)
    # the Geant4 data (SOURCE.txt): 0.051 0.187 0.250 0.202 0.134 ...; GFLASH is within a few points
    data = np.array([0.051, 0.187, 0.250, 0.202, 0.134, 0.080, 0.045, 0.024, 0.013, 0.007, 0.003, 0.002])
    assert np.abs(frac - data).max() < 0.05
    src = open_synth_source(f"synth:{NAI}?n=10&particle=e-")
    assert src.geometry.name == "nai-gears" and src.read(0, 3).voxels.shape == (3, 1728)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("layers:\n  - {nx: 0, ny: 4, cell_mm: 5}\n", r"layers\[0\]\.nx: expected a positive integer, got 0"),
        ("layers:\n  - {nx: 4, ny: 4, cell_mm: 5, thikness_mm: 3}\n", r"layers\[0\]\.thikness_mm: unknown key"),
        ("layers:\n  - {r_edges: [0, 5, 3], n_alpha: 4}\n", r"layers\[0\]\.r_edges: must increase strictly"),
        ("layers:\n  - {nx: 4, ny: 4, cell_mm: 5}\nmaterial: {x0_mm: 10, moliere_mm: 20, critical_energy_mev: 10}\n",
         r"layers\[0\]\.thickness_mm: missing"),
        ("layers: [\n", r"not valid YAML"),
        ("layers:\n  - {nx: 4, ny: 4, cell_mm: 5, r_edges: [0, 1]}\n", r"layers\[0\]: give either nx, ny and cell_mm"),
        ("name: calogan\nlayers:\n  - {nx: 4, ny: 4, cell_mm: 5}\n", r"name: 'calogan' is a preset's name"),
        ("layers:\n  - {nx: 4, ny: 4, cell_mm: 5, thickness_mm: 1}\nmaterial: {x0_mm: -1, moliere_mm: 2, "
         "critical_energy_mev: 3}\n", r"material\.x0_mm: must be positive, got -1"),
        ("layers:\n  - {nx: 4, ny: 4, cell_mm: 5, thickness_mm: 1}\nmaterial: {x0_mm: 1, moliere_mm: 2}\n",
         r"material\.critical_energy_mev: missing"),
        ("layers:\n  - {nx: 4, ny: 4}\n", r"layers\[0\]\.cell_mm: missing"),
        ("layers: []\n", r"layers: missing or empty"),
        ("- 1\n- 2\n", r"expected a mapping with 'layers'"),
        ("layers:\n  - {nx: 2, ny: 2, cell_mm: 1, index: 3}\n  - {nx: 2, ny: 2, cell_mm: 1, index: 3}\n",
         r"layers: index 3 used twice"),
        ("layers:\n  - {nx: 2, ny: 2, cell_mm: 1, thickness_mm: 1}\nmaterial: {x0_mm: 1, moliere_mm: 2, "
         "critical_energy_mev: 3, sampling_fraction: 1.5}\n", r"material\.sampling_fraction: must be in \(0, 1\]"),
    ],
)
def test_bad_geometry_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(CalodistillError, match=message) as exc:
        get_geometry(path)
    assert "\n" not in str(exc.value) and str(exc.value).startswith(str(path))


def test_missing_file_unknown_name_and_synth_without_material(tmp_path: Path) -> None:
    with pytest.raises(CalodistillError, match=r"nope\.yaml: no such geometry file"):
        get_geometry(tmp_path / "nope.yaml")
    with pytest.raises(CalodistillError, match=r"unknown geometry 'nosuch'.*or the path of a geometry \.yaml"):
        get_geometry("nosuch")
    bare = _write(tmp_path, "layers:\n  - {nx: 2, ny: 2, cell_mm: 1}\n", "bare.yaml")
    with pytest.raises(CalodistillError, match=r"synth: geometry 'bare' .*declares no material"):
        SynthSpec(str(bare), 5)
    with pytest.raises(CalodistillError, match=r"cut\.xml: .*binning XML"):
        get_geometry(_write(tmp_path, "<Bins><Bin><Layer", "cut.xml"))
