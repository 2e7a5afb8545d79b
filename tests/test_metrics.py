"""Metrics on aggregated rows equal scikit-learn's on the same data expanded to binary rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from nlpctr.models import metrics as m


@pytest.fixture(scope="module")
def aggregated() -> tuple[m.Labels, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 300
    impressions = rng.integers(1, 40, size=n)
    p_true = rng.uniform(0.01, 0.3, size=n)
    clicks = rng.binomial(impressions, p_true)
    predictions = np.clip(p_true + rng.normal(0, 0.05, size=n), 0.001, 0.999)
    groups = rng.integers(0, 25, size=n).astype(str)
    return m.Labels(impressions, clicks, groups), predictions


def expand(labels: m.Labels, predictions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, p, g = [], [], []
    for i, (n, c) in enumerate(zip(labels.impressions, labels.clicks, strict=True)):
        y += [1] * c + [0] * (n - c)
        p += [predictions[i]] * n
        g += [labels.groups[i]] * n
    return np.array(y), np.array(p), np.array(g)


def test_auc_and_logloss_match_sklearn_on_binary_expansion(aggregated) -> None:
    labels, p = aggregated
    y, p_bin, _ = expand(labels, p)
    assert m.auc(labels, p) == pytest.approx(roc_auc_score(y, p_bin), abs=1e-12)
    assert m.logloss(labels, p) == pytest.approx(log_loss(y, p_bin), abs=1e-12)
    binary = m.Labels(np.ones_like(y), y)
    assert m.auc(binary, p_bin) == pytest.approx(m.auc(labels, p), abs=1e-12)


def test_rig_calibration_and_ece(aggregated) -> None:
    labels, p = aggregated
    ctr = labels.clicks.sum() / labels.impressions.sum()
    constant = np.full(len(p), ctr)
    assert m.rig(labels, constant, ctr) == pytest.approx(0.0, abs=1e-9)
    assert m.rig(labels, p, ctr) > 0
    assert m.calibration_ratio(labels, constant) == pytest.approx(1.0)
    assert m.calibration_ratio(labels, constant * 2) == pytest.approx(2.0)
    curve = m.calibration_bins(labels, p, bins=10)
    assert sum(b["impressions"] for b in curve) == labels.impressions.sum()
    # Predicting each row's own observed CTR is calibrated in every bin.
    assert m.ece(labels, labels.clicks / labels.impressions) == pytest.approx(0.0, abs=1e-12)
    assert 0 < m.ece(labels, p) < 0.2


def test_gauc_is_impression_weighted_mean_of_group_aucs(aggregated) -> None:
    labels, p = aggregated
    y, p_bin, g = expand(labels, p)
    total = weighted = 0.0
    for group in np.unique(g):
        mask = g == group
        if 0 < y[mask].sum() < mask.sum():
            weighted += mask.sum() * roc_auc_score(y[mask], p_bin[mask])
            total += mask.sum()
    assert m.gauc(labels, p) == pytest.approx(weighted / total, abs=1e-12)


def test_paired_bootstrap_sees_a_real_difference_and_not_a_fake_one(aggregated) -> None:
    labels, p = aggregated
    noise = np.random.default_rng(1).uniform(0.01, 0.3, size=len(p))
    better = m.paired_bootstrap_diff(m.auc, labels, p, noise, rounds=100)
    assert better.estimate > 0 and better.significant
    same = m.paired_bootstrap_diff(m.auc, labels, p, p, rounds=50)
    assert same.estimate == 0 and not same.significant
    ci = m.bootstrap_ci(m.auc, labels, p, rounds=100)
    assert ci.low <= ci.estimate <= ci.high


def test_bootstrap_resamples_whole_groups() -> None:
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    for idx in m.group_bootstrap_indices(groups, rounds=20, seed=3):
        drawn = groups[idx]
        for name, size in (("a", 2), ("b", 1), ("c", 3)):
            assert (drawn == name).sum() % size == 0


def test_labels_are_checked() -> None:
    with pytest.raises(ValueError):
        m.Labels(np.array([1, 2]), np.array([2, 0]))
