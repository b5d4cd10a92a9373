"""Classifier two-sample test: chance for one distribution, near 1 for clearly different ones."""

from __future__ import annotations

import numpy as np
import pytest

from calodistill.pipeline.data.geometry import get_geometry
from calodistill.pipeline.data.showers import Showers
from calodistill.pipeline.errors import CalodistillError
from calodistill.pipeline.metrics.classifier import (
    ClassifierConfig,
    classifier_two_sample_test,
    high_level_features,
    low_level_features,
    roc_auc,
)

FAST = ClassifierConfig(hidden=(32, 32), max_epochs=20, patience=3, batch_size=200)


def test_roc_auc_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + y * 0.7
    s[:20] = 0.5  # ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0


def test_same_distribution_gives_chance() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(2000, 8))
    b = rng.normal(size=(2000, 8))
    res = classifier_two_sample_test(a, b, FAST, seed=0)
    assert abs(res.auc - 0.5) < 0.05
    assert res.jsd < 0.05
    assert res.n_test == 800 and res.n_train == 2400 and res.n_val == 800
    assert 1 <= res.best_epoch <= res.epochs <= FAST.max_epochs
    assert len(res.history["val_loss"]) == res.epochs


def test_different_distributions_give_auc_near_one_and_are_seeded() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(1500, 8))
    b = rng.normal(size=(1500, 8))
    b[:, 2] += 4.0
    res = classifier_two_sample_test(a, b, FAST, seed=1)
    assert res.auc > 0.97 and res.accuracy > 0.9 and res.jsd > 0.5
    again = classifier_two_sample_test(a, b, FAST, seed=1)
    assert again.auc == res.auc and again.epochs == res.epochs


def test_features_on_showers() -> None:
    geo = get_geometry("calogan")
    rng = np.random.default_rng(0)
    s = Showers(geo, np.array([100.0, 1000.0]), rng.exponential(size=(2, geo.n_voxels)))
    low = low_level_features(s)
    assert low.shape == (2, 1 + geo.n_voxels)
    np.testing.assert_allclose(low[:, 0], [2.0, 3.0])
    np.testing.assert_allclose(low[1, 1:], s.voxels[1] / 1000.0, rtol=1e-6)
    high = high_level_features(s)
    assert high.shape == (2, 1 + 1 + 6 * geo.n_layers) and np.isfinite(high).all()


def test_bad_inputs_raise() -> None:
    with pytest.raises(CalodistillError, match="equal widths"):
        classifier_two_sample_test(np.zeros((50, 3)), np.zeros((50, 4)), FAST)
    with pytest.raises(CalodistillError, match="at least 10"):
        classifier_two_sample_test(np.zeros((5, 3)), np.zeros((50, 3)), FAST)
    with pytest.raises(CalodistillError, match="NaN"):
        classifier_two_sample_test(np.full((50, 3), np.nan), np.zeros((50, 3)), FAST)
    with pytest.raises(CalodistillError, match="unknown key 'epochs'"):
        ClassifierConfig.from_dict({"epochs": 3})
    assert ClassifierConfig.from_dict({"preset": "calochallenge", "max_epochs": 2}).hidden == (512, 512, 512)
    with pytest.raises(CalodistillError, match="fractions"):
        ClassifierConfig(fractions=(0.5, 0.5, 0.5))
