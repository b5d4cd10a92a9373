"""Observables on hand-made showers with known centroids, widths and sparsity; the separation power."""

from __future__ import annotations

import numpy as np
import pytest

from calodistill.pipeline.data.geometry import get_geometry
from calodistill.pipeline.data.showers import Showers
from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.metrics.observables import (
    compute_observables,
    observable_names,
    separation_power,
    separation_powers,
    shared_bin_edges,
)


def _calogan_shower(layer_cells: dict[int, dict[tuple[int, int], float]]) -> np.ndarray:
    geo = get_geometry("calogan")
    layers = [np.zeros(layer.shape, dtype=np.float32) for layer in geo.layers]
    for li, cells in layer_cells.items():
        for (r, c), e in cells.items():
            layers[li][r, c] = e
    return geo.join_layers(layers)


def test_names_use_layer_index_and_cover_every_layer() -> None:
    geo = get_geometry("calochallenge-1-photons")
    names = observable_names(geo)
    idx = [layer.index for layer in geo.layers]
    assert f"E_layer{idx[-1]}" in names and "Etot_over_Einc" in names
    assert f"width_y_layer{idx[0]}" in names and f"sparsity_layer{idx[2]}" in names
    # polar layers add the radial mean and width; Cartesian ones do not
    assert f"radius_layer{idx[0]}" in names and f"width_r_layer{idx[-1]}" in names
    assert len(names) == 1 + 8 * geo.n_layers
    cart = get_geometry("calogan")
    assert len(observable_names(cart)) == 1 + 6 * cart.n_layers
    assert not any(n.startswith(("radius", "width_r")) for n in observable_names(cart))


def test_radial_observables_of_a_polar_layer() -> None:
    geo = get_geometry("calochallenge-1-photons")
    layer = next(lay for lay in geo.layers if lay.shape[1] >= 2)
    k = geo.layers.index(layer)
    r = np.asarray(layer.edges1)
    rbar = (2.0 / 3.0) * (r[1:] ** 3 - r[:-1] ** 3) / (r[1:] ** 2 - r[:-1] ** 2)
    v = np.zeros((1, geo.n_voxels), dtype=np.float32)
    lay = np.zeros(layer.shape, dtype=np.float32)
    lay[0, 0], lay[-1, 1] = 1.0, 3.0  # radial bins 0 and 1, in two angular bins
    v[0, geo.layer_slices[k]] = lay.ravel()
    obs = compute_observables(Showers(geo, np.array([1000.0]), v))
    mean = (rbar[0] + 3 * rbar[1]) / 4
    np.testing.assert_allclose(obs[f"radius_layer{layer.index}"][0], mean, rtol=1e-6)
    np.testing.assert_allclose(obs[f"width_r_layer{layer.index}"][0],
                               np.sqrt((rbar[0] - mean) ** 2 / 4 + 3 * (rbar[1] - mean) ** 2 / 4), rtol=1e-5)


def test_known_centroid_width_sparsity_on_calogan() -> None:
    geo = get_geometry("calogan")
    # Layer 1: 12×12 cells of 40 mm from -240 mm; column 5 is centred at x = -20, column 7 at x = +60.
    # Row 6 is centred at y = +20. Energies 1 and 3 MeV: centroid x = (-20 + 3·60)/4 = 40,
    # width x = sqrt((1·60² + 3·20²)/4) = sqrt(1200).
    v1 = _calogan_shower({1: {(6, 5): 1.0, (6, 7): 3.0}, 0: {(1, 48): 2.0}})
    # second shower: layer 1 empty, layer 2 uniform energy 0.01 below the threshold 0.02
    v2 = _calogan_shower({2: {(r, c): 0.01 for r in range(12) for c in range(6)}, 0: {(0, 0): 5.0}})
    showers = Showers(geo, np.array([100.0, 50.0]), np.stack([v1, v2]))
    obs = compute_observables(showers, threshold=0.02)
    assert set(obs) == set(observable_names(geo))
    assert all(np.isfinite(v).all() and v.shape == (2,) for v in obs.values())
    np.testing.assert_allclose(obs["E_layer1"], [4.0, 0.0])
    np.testing.assert_allclose(obs["centroid_x_layer1"], [40.0, 0.0])
    np.testing.assert_allclose(obs["centroid_y_layer1"], [20.0, 0.0])
    np.testing.assert_allclose(obs["width_x_layer1"], [np.sqrt(1200.0), 0.0])
    np.testing.assert_allclose(obs["width_y_layer1"], [0.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(obs["sparsity_layer1"], [2 / 144, 0.0])
    # layer 2: symmetric uniform → centroid 0, width of a uniform comb; all cells below threshold
    np.testing.assert_allclose(obs["centroid_x_layer2"][1], 0.0, atol=1e-9)
    xs = np.linspace(-200.0, 200.0, 6)
    np.testing.assert_allclose(obs["width_x_layer2"][1], np.sqrt(np.mean(xs**2)), rtol=1e-6)
    assert obs["sparsity_layer2"][1] == 0.0
    # layer 0: 3 rows of 160 mm (row 1 centred at y=0), 96 columns of 5 mm (column 48 centred at 2.5)
    np.testing.assert_allclose(obs["centroid_x_layer0"], [2.5, -237.5])
    np.testing.assert_allclose(obs["centroid_y_layer0"], [0.0, -160.0])
    np.testing.assert_allclose(obs["Etot_over_Einc"], [6.0 / 100.0, (5.0 + 72 * 0.01) / 50.0], rtol=1e-6)
    np.testing.assert_allclose(obs["sparsity_layer0"], [1 / 288, 1 / 288])


def test_polar_ring_has_centroid_at_origin_and_sector_off_axis() -> None:
    geo = get_geometry("calochallenge-1-photons")
    ring = next(layer for layer in geo.layers if layer.shape[0] == 1)
    multi = next(layer for layer in geo.layers if layer.shape[0] > 1)
    v = np.zeros((1, geo.n_voxels), dtype=np.float32)
    sl_ring = geo.layer_slices[geo.layers.index(ring)]
    v[0, sl_ring.start] = 10.0  # innermost radial bin of a full ring
    sl_multi = geo.layer_slices[geo.layers.index(multi)]
    v[0, sl_multi.start] = 7.0  # first angular bin (just above -π), innermost radial bin
    obs = compute_observables(Showers(geo, np.array([1000.0]), v))
    assert abs(obs[f"centroid_x_layer{ring.index}"][0]) < 1e-9
    assert abs(obs[f"centroid_y_layer{ring.index}"][0]) < 1e-9
    x, y = multi.cell_xy()
    np.testing.assert_allclose(obs[f"centroid_x_layer{multi.index}"][0], x[0], rtol=1e-6)
    np.testing.assert_allclose(obs[f"centroid_y_layer{multi.index}"][0], y[0], rtol=1e-6)
    assert obs[f"centroid_x_layer{multi.index}"][0] < 0  # angle near -π points along -x


def test_empty_showers_give_zeros_not_nan() -> None:
    geo = get_geometry("calogan")
    obs = compute_observables(Showers(geo, np.array([10.0, 20.0]), np.zeros((2, geo.n_voxels))))
    for name, values in obs.items():
        assert np.all(values == 0.0), name


def test_separation_power_identical_disjoint_and_partial() -> None:
    rng = np.random.default_rng(1)
    a = rng.normal(size=5000)
    assert separation_power(a, a.copy()) == pytest.approx(0.0, abs=1e-12)
    assert separation_power(a, a + 100.0) == pytest.approx(1.0)
    assert separation_power(np.zeros(100), np.ones(100)) == pytest.approx(1.0)
    # half the mass shared: h1 = (1/2, 1/2, 0), h2 = (0, 1/2, 1/2) on 3 bins → ½(¼/½ + 0 + ¼/½) = ½
    edges = np.array([-0.5, 0.5, 1.5, 2.5])
    assert separation_power(np.array([0.0, 1.0]), np.array([1.0, 2.0]), bins=edges) == pytest.approx(0.5)
    # same distribution, different draws: small
    assert separation_power(a, rng.normal(size=5000)) < 0.02
    # constant observable in both samples (e.g. an always-empty layer): 0, not NaN
    assert separation_power(np.zeros(10), np.zeros(20)) == 0.0
    # disjoint samples whose normalised histograms sum to 1 + an ulp: still at most 1
    draw = np.random.default_rng(0)
    sizes = [(int(draw.integers(3, 300)), int(draw.integers(3, 300))) for _ in range(200)]
    powers = [separation_power(draw.normal(size=n), draw.normal(size=m) + 50.0) for n, m in sizes]
    assert max(powers) <= 1.0 and min(powers) == pytest.approx(1.0)
    with pytest.raises(CalodistillError, match="non-empty"):
        separation_power(np.array([]), a)


def test_separation_powers_for_every_observable_and_edges() -> None:
    geo = get_geometry("calogan")
    rng = np.random.default_rng(0)
    v = rng.exponential(1.0, size=(200, geo.n_voxels)).astype(np.float32)
    s = Showers(geo, np.full(200, 1000.0), v)
    ref = compute_observables(s)
    gen = compute_observables(Showers(geo, np.full(200, 1000.0), 2 * v))
    seps = separation_powers(ref, gen)
    assert set(seps) == set(ref)
    assert seps["E_layer0"] > 0.9 and seps["centroid_x_layer1"] < 1e-12
    edges = shared_bin_edges([np.array([1.0, 2.0]), np.array([3.0])], bins=4)
    np.testing.assert_allclose(edges, [1.0, 1.5, 2.0, 2.5, 3.0])
    with pytest.raises(CalodistillError, match="lack"):
        separation_powers(ref, {"E_layer0": gen["E_layer0"]})
