"""Likelihood helpers: incident-energy bins, per-bin means, seeded subsets; the model metrics themselves
run on tiny untrained flows in tests/pipeline/stages/test_evaluate.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calodistill.pipeline.data.geometry import get_geometry
from calodistill.pipeline.data.showers import Showers
from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.metrics.likelihoods import (
    as_numpy,
    energy_bin_edges,
    per_bin_means,
    seeded_subset,
    shower_log_likelihood,
)


def test_energy_bins() -> None:
    np.testing.assert_allclose(energy_bin_edges(np.array([1e3, 1e3, 4e3]), 5), [990.0, 2000.0, 4040.0])
    edges = energy_bin_edges(np.geomspace(1e3, 1e5, 100), 4)
    assert len(edges) == 5 and edges[0] < 1e3 and edges[-1] > 1e5
    np.testing.assert_allclose(energy_bin_edges(np.array([5e3, 5e3])), [4950.0, 5050.0])
    with pytest.raises(CalodistillError, match="no positive incident energies"):
        energy_bin_edges(np.array([0.0, -1.0, np.nan]))


def test_per_bin_means_clip_out_of_range_energies_and_leave_empty_bins_nan() -> None:
    edges = np.array([1.0, 10.0, 100.0, 1000.0])
    values = np.array([1.0, 3.0, 10.0, 20.0])
    energies = np.array([0.5, 5.0, 2000.0, 5000.0])  # below the first edge → bin 0, above the last → bin 2
    np.testing.assert_allclose(per_bin_means(values, energies, edges), [2.0, np.nan, 15.0])


def test_seeded_subset_is_reproducible_and_keeps_order() -> None:
    geo = get_geometry("calogan")
    showers = Showers(geo, np.arange(1.0, 51.0) * 1e3, np.zeros((50, geo.n_voxels), dtype=np.float32))
    assert seeded_subset(showers, None, 0) is showers and seeded_subset(showers, 50, 0) is showers
    a, b = seeded_subset(showers, 10, 3), seeded_subset(showers, 10, 3)
    assert len(a) == 10 and np.array_equal(a.incident_energy, b.incident_energy)
    assert np.all(np.diff(a.incident_energy) > 0)
    assert not np.array_equal(a.incident_energy, seeded_subset(showers, 10, 4).incident_energy)


class _FixedGenerator:
    """A stand-in generator whose log-likelihood is minus the incident energy in GeV."""

    def log_prob(self, incident_energy: np.ndarray, voxels: np.ndarray, batch_size: int, seed: int) -> dict:
        return {"total": torch.as_tensor(-incident_energy / 1e3, dtype=torch.float32), "flow1": None}


def test_shower_log_likelihood_takes_the_total_as_float64() -> None:
    geo = get_geometry("calogan")
    showers = Showers(geo, np.array([1e3, 2e3]), np.zeros((2, geo.n_voxels), dtype=np.float32))
    ll = shower_log_likelihood(_FixedGenerator(), showers)
    assert ll.dtype == np.float64 and ll.shape == (2,)
    np.testing.assert_allclose(ll, [-1.0, -2.0])
    np.testing.assert_array_equal(as_numpy(torch.ones(2, requires_grad=True)), [1.0, 1.0])
