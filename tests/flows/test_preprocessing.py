"""CaloFlowPreprocessor: exact round trip, empty layers, seeded noise, thresholds, persistence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calodistill.flows.errors import FlowsError
from calodistill.flows.preprocessing import ENERGY_UNIT_MEV, CaloFlowPreprocessor

SIZES = [3, 4, 2]
Fitted = tuple[CaloFlowPreprocessor, np.ndarray, np.ndarray]


def make_showers(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    e_inc = rng.uniform(1e3, 1e5, n)
    vox = rng.exponential(1.0, (n, sum(SIZES))) * e_inc[:, None] / 20.0
    vox[rng.random(vox.shape) < 0.3] = 0.0
    vox[0, 3:7] = 0.0  # an empty middle layer
    vox[1, :] = 0.0  # an empty shower
    vox[2, 7:] = 0.0  # an empty last layer
    return e_inc, vox.astype(np.float32)


@pytest.fixture
def fitted() -> Fitted:
    e_inc, vox = make_showers()
    return CaloFlowPreprocessor(SIZES).fit(e_inc, vox), e_inc, vox


def test_round_trip_exact_without_noise(fitted: Fitted) -> None:
    pre, e_inc, vox = fitted
    t = pre.transform(e_inc, vox, add_noise=False)
    assert t.flow1_x.shape == (40, 3) and t.flow1_context.shape == (40, 1)
    assert t.flow2_x.shape == (40, 9) and t.flow2_context.shape == (40, 4)
    for arr in (t.flow1_x, t.flow1_context, t.flow2_x, t.flow2_context):
        assert np.isfinite(arr).all()
    layer_e = pre.layer_energies_from_flow1(t.flow1_x, e_inc)
    v64 = vox.astype(np.float64)
    truth = np.stack([v64[:, :3].sum(1), v64[:, 3:7].sum(1), v64[:, 7:].sum(1)], axis=1)
    np.testing.assert_allclose(layer_e, truth, rtol=1e-9, atol=1e-9)
    assert np.all(layer_e[1] == 0) and layer_e[0, 1] == 0 and layer_e[2, 2] == 0
    back = pre.voxels_from_flow2(t.flow2_x, layer_e, voxel_threshold=0.0)
    np.testing.assert_allclose(back, vox, rtol=1e-9, atol=1e-9)
    assert np.all(back[1] == 0) and np.all(back[0, 3:7] == 0)


def test_round_trip_torch_float32(fitted: Fitted) -> None:
    pre, e_inc, vox = fitted
    e_t, v_t = torch.as_tensor(e_inc), torch.as_tensor(vox)
    x1, c1 = pre.flow1_inputs(e_t, v_t, add_noise=False)
    x2, c2 = pre.flow2_inputs(e_t, v_t, add_noise=False)
    assert x1.dtype == torch.float32 and c2.dtype == torch.float32 and x2.shape == (40, 9)
    layer_e = pre.layer_energies_from_flow1(x1.double(), e_t)
    back = pre.voxels_from_flow2(x2, layer_e, voxel_threshold=0.0)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.float32
    np.testing.assert_allclose(back.numpy(), vox, rtol=1e-4, atol=1e-3)


def test_logit_values_and_units(fitted: Fitted) -> None:
    pre, e_inc, vox = fitted
    t = pre.transform(e_inc, vox, add_noise=False)
    u0 = vox.sum(1) / e_inc / pre.energy_ratio_scale
    a = pre.alpha
    expect = np.log(a + (1 - 2 * a) * u0) - np.log1p(-(a + (1 - 2 * a) * u0))
    np.testing.assert_allclose(t.flow1_x[:, 0], expect, rtol=1e-6, atol=1e-6)
    lim = np.log((1 - a) / a)
    assert np.abs(t.flow2_x).max() <= lim + 1e-9
    c = (np.log10(e_inc / ENERGY_UNIT_MEV + 1e-8) - pre.cond_mean[0]) / pre.cond_std[0]
    np.testing.assert_allclose(t.flow1_context[:, 0], c, rtol=1e-12)
    np.testing.assert_allclose(t.flow2_context[:, 0], c, rtol=1e-12)
    assert abs(np.mean(t.flow1_context)) < 0.2  # standardised by the fit


def test_noise_is_seeded_and_small(fitted: Fitted) -> None:
    pre, e_inc, vox = fitted
    a = pre.transform(e_inc, vox, rng=np.random.default_rng(7))
    b = pre.transform(e_inc, vox, rng=np.random.default_rng(7))
    c = pre.transform(e_inc, vox, rng=np.random.default_rng(8))
    np.testing.assert_array_equal(a.flow2_x, b.flow2_x)
    assert not np.array_equal(a.flow2_x, c.flow2_x)
    tg1 = pre.transform(torch.as_tensor(e_inc), torch.as_tensor(vox), rng=torch.Generator().manual_seed(1))
    tg2 = pre.transform(torch.as_tensor(e_inc), torch.as_tensor(vox), rng=torch.Generator().manual_seed(1))
    assert torch.equal(tg1.flow2_x, tg2.flow2_x)
    # noisy voxels are normalised within each layer: fractions sum to 1 everywhere (no empty layer left)
    frac = (1 / (1 + np.exp(-a.flow2_x)) - pre.alpha) / (1 - 2 * pre.alpha)
    np.testing.assert_allclose(frac[:, :3].sum(1), 1.0, rtol=1e-6)
    extra = a.layer_energies.sum(1) - vox.sum(1)
    assert (extra > 0).all() and (extra < pre.noise_level * 9).all()
    assert np.isfinite(a.flow2_context).all()


def test_threshold_zeroes_and_renormalises(fitted: Fitted) -> None:
    pre, e_inc, vox = fitted
    t = pre.transform(e_inc, vox, add_noise=False)
    layer_e = pre.layer_energies_from_flow1(t.flow1_x, e_inc)
    thr = float(np.quantile(vox[vox > 0], 0.3))
    back = pre.voxels_from_flow2(t.flow2_x, layer_e, voxel_threshold=thr)
    assert ((back == 0) | (back >= thr * 0.999)).all()
    sums = np.stack([back[:, :3].sum(1), back[:, 3:7].sum(1), back[:, 7:].sum(1)], axis=1)
    kept = sums > 0
    np.testing.assert_allclose(sums[kept], layer_e[kept], rtol=1e-9)


def test_inverse_of_generated_values_is_safe(fitted: Fitted) -> None:
    pre, e_inc, _ = fitted
    rng = np.random.default_rng(3)
    u = rng.normal(0, 20, (40, 3))  # beyond the logit range on purpose
    layer_e = pre.layer_energies_from_flow1(u, e_inc)
    assert np.isfinite(layer_e).all() and (layer_e >= 0).all()
    assert (layer_e.sum(1) <= e_inc * pre.energy_ratio_scale * (1 + 1e-12)).all()
    layer_e[0] = 0.0
    vox = pre.voxels_from_flow2(rng.normal(0, 20, (40, 9)), layer_e)
    assert np.isfinite(vox).all() and (vox >= 0).all() and np.all(vox[0] == 0)
    ctx = pre.flow2_context(e_inc, layer_e)
    assert np.isfinite(ctx).all()


def test_energy_ratio_above_one_stays_invertible() -> None:
    e_inc, vox = make_showers()
    vox[5] *= 50  # deposits more than the incident energy
    pre = CaloFlowPreprocessor(SIZES).fit(e_inc, vox)
    assert pre.energy_ratio_scale > 1
    t = pre.transform(e_inc, vox, add_noise=False)
    layer_e = pre.layer_energies_from_flow1(t.flow1_x, e_inc)
    np.testing.assert_allclose(layer_e.sum(1), vox.astype(np.float64).sum(1), rtol=1e-9)


def test_state_dict_json_round_trip(fitted: Fitted, tmp_path: Path) -> None:
    pre, e_inc, vox = fitted
    state = json.loads(json.dumps(pre.state_dict()))
    again = CaloFlowPreprocessor.from_state_dict(state)
    a = pre.transform(e_inc, vox, rng=np.random.default_rng(1))
    b = again.transform(e_inc, vox, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a.flow2_context, b.flow2_context)
    pre.save(tmp_path / "preprocessing.json")
    loaded = CaloFlowPreprocessor.load(tmp_path / "preprocessing.json")
    assert loaded.state_dict() == pre.state_dict()
    with pytest.raises(FlowsError, match="unknown key 'extra'"):
        CaloFlowPreprocessor.from_state_dict({**state, "extra": 1})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(FlowsError, match="bad.json: not valid JSON"):
        CaloFlowPreprocessor.load(tmp_path / "bad.json")


def test_bad_inputs_raise() -> None:
    e_inc, vox = make_showers()
    pre = CaloFlowPreprocessor(SIZES)
    with pytest.raises(FlowsError, match="fit"):
        pre.transform(e_inc, vox)
    with pytest.raises(FlowsError, match="voxels: expected shape"):
        pre.fit(e_inc, vox[:, :-1])
    with pytest.raises(FlowsError, match="incident_energy: must be positive"):
        pre.fit(-e_inc, vox)
    bad = vox.copy()
    bad[0, 0] = -1
    with pytest.raises(FlowsError, match="negative"):
        pre.fit(e_inc, bad)
    with pytest.raises(FlowsError, match="layer_sizes"):
        CaloFlowPreprocessor([])
