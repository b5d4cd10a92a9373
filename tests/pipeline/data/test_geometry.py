"""Tests for pipeline/geometry.py against the CaloChallenge binning XML files (parsed independently here)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from calodistill.pipeline.data.geometry import (
    GEOMETRY_NAMES,
    get_geometry,
    infer_geometry,
)
from calodistill.pipeline.errors import CalodistillError

XML = {
    "calochallenge-1-photons": "binning_dataset_1_photons.xml",
    "calochallenge-1-pions": "binning_dataset_1_pions.xml",
    "calochallenge-2": "binning_dataset_2.xml",
    "calochallenge-3": "binning_dataset_3.xml",
}
COUNTS = {"calogan": 504, "calochallenge-1-photons": 368, "calochallenge-1-pions": 533,
          "calochallenge-2": 6480, "calochallenge-3": 40500}


def _xml_layers(path: Path) -> list[tuple[int, int, list[float]]]:
    """(id, n_alpha, r_edges) of every XML layer with at least one radial bin, in file order."""
    out = []
    for elem in ET.parse(path).getroot().iter("Layer"):
        edges = [float(v) for v in elem.get("r_edges").split(",")]
        if len(edges) > 1:
            out.append((int(elem.get("id")), int(elem.get("n_bin_alpha")), edges))
    return out


@pytest.mark.parametrize("name", list(COUNTS))
def test_voxel_counts(name: str) -> None:
    assert get_geometry(name).n_voxels == COUNTS[name]
    assert name in GEOMETRY_NAMES


@pytest.mark.parametrize("name", list(XML))
def test_layers_match_the_xml_files(shared_dir: Path, name: str) -> None:
    path = shared_dir / "data" / "real" / "calochallenge-binning" / XML[name]
    xml = _xml_layers(path)
    geo = get_geometry(name)
    assert [layer.index for layer in geo.layers] == [i for i, _, _ in xml]
    for layer, (_, n_alpha, r_edges) in zip(geo.layers, xml):
        assert layer.kind == "polar"
        assert layer.shape == (n_alpha, len(r_edges) - 1)  # (angular bin, radial bin)
        np.testing.assert_allclose(layer.edges1, r_edges)
        assert layer.edges0[0] == pytest.approx(-np.pi) and layer.edges0[-1] == pytest.approx(np.pi)
    assert geo.layer_sizes == [a * (len(r) - 1) for _, a, r in xml]


def test_packaged_xml_equals_shared_copy(shared_dir: Path) -> None:
    from importlib import resources

    for fname in XML.values():
        packaged = resources.files("calodistill.pipeline.data").joinpath("binning", fname).read_text()
        assert packaged == (shared_dir / "data" / "real" / "calochallenge-binning" / fname).read_text()


def test_calogan_layers() -> None:
    geo = get_geometry("calogan")
    assert [layer.shape for layer in geo.layers] == [(3, 96), (12, 12), (12, 6)]
    # cells of 160×5, 40×40 and 40×80 mm (rows along y × columns along x), 480 mm across
    widths = [(np.diff(l.edges0)[0], np.diff(l.edges1)[0]) for l in geo.layers]
    assert widths == [(160.0, 5.0), (40.0, 40.0), (40.0, 80.0)]
    for layer in geo.layers:
        assert layer.cell_area().sum() == pytest.approx(480.0 * 480.0)


@pytest.mark.parametrize("name", ["calogan", "calochallenge-1-pions", "calochallenge-2"])
def test_split_join_round_trip_and_order(name: str) -> None:
    geo = get_geometry(name)
    flat = np.arange(3 * geo.n_voxels, dtype=np.float64).reshape(3, geo.n_voxels)
    layers = geo.split_layers(flat)
    assert [l.shape[1:] for l in layers] == [layer.shape for layer in geo.layers]
    np.testing.assert_array_equal(geo.join_layers(layers), flat)
    # voxel order is (layer, angular/row bin, radial/column bin): C order inside each layer
    first = layers[0][0]
    assert first[0, 1] == first[0, 0] + 1
    if first.shape[0] > 1:
        assert first[1, 0] == first[0, 0] + geo.layers[0].shape[1]
    np.testing.assert_allclose(geo.layer_energies(flat), np.stack([l.reshape(3, -1).sum(1) for l in layers], 1))


def test_polar_cell_area_and_centroids() -> None:
    geo = get_geometry("calochallenge-1-photons")
    layer = geo.layers[1]
    r = np.asarray(layer.edges1)
    assert layer.cell_area().sum() == pytest.approx(np.pi * r[-1] ** 2)
    x, y = layer.cell_xy()
    assert abs(x.sum()) < 1e-6 and abs(y.sum()) < 1e-6  # sectors symmetric around the axis
    x0, y0 = geo.layers[0].cell_xy()  # one angular bin: ring centroids at the origin
    np.testing.assert_allclose(np.hypot(x0, y0), 0.0, atol=1e-9)


def test_errors() -> None:
    geo = get_geometry("calogan")
    with pytest.raises(CalodistillError, match="expected 504 voxels"):
        geo.split_layers(np.zeros((2, 503)))
    with pytest.raises(CalodistillError, match="expected 3 layers"):
        geo.join_layers([np.zeros((1, 3, 96))])
    with pytest.raises(CalodistillError, match="unknown geometry"):
        get_geometry("atlas")
    assert infer_geometry(6480).name == "calochallenge-2"
    with pytest.raises(CalodistillError, match="fits no known geometry"):
        infer_geometry(505, "f.h5")
