"""Redundancy measures on synthetic data whose answer is known (no model is trained)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from nlpctr.models import metrics
from nlpctr.models import redundancy as r
from nlpctr.models.ctr_net import CtrModel, InputShape, NetConfig
from nlpctr.models.data import Tensors


def aggregated_labels(rng: np.random.Generator, logit: np.ndarray) -> metrics.Labels:
    impressions = rng.integers(1, 200, size=len(logit))
    clicks = rng.binomial(impressions, 1 / (1 + np.exp(-logit)))
    return metrics.Labels(impressions, clicks, (np.arange(len(logit)) % 50).astype(str))


def test_cka_is_one_under_rotation_and_scale_zero_when_independent_and_symmetric() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8))
    rotated = 3.0 * x @ ortho_group.rvs(8, random_state=1)
    assert r.linear_cka(x, rotated) == pytest.approx(1.0, abs=1e-9)
    y = rng.normal(size=(500, 5))
    assert r.linear_cka(x, y) == pytest.approx(r.linear_cka(y, x), abs=1e-12)
    big_x, big_y = rng.normal(size=(20_000, 8)), rng.normal(size=(20_000, 5))
    assert r.linear_cka(big_x, big_y) < 0.01
    # Weights are row repeats: weight 2 on a row equals that row twice.
    w = rng.integers(1, 3, size=500)
    repeated = np.repeat(np.arange(500), w)
    assert r.linear_cka(x, y, w) == pytest.approx(r.linear_cka(x[repeated], y[repeated]), abs=1e-12)


def test_probe_r2_high_for_linear_feature_low_for_noise() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 12))
    linear = x @ rng.normal(size=12) + 0.01 * rng.normal(size=3000)
    assert r.probe_r2(x[:2000], linear[:2000], x[2000:], linear[2000:]) > 0.99
    noise = rng.normal(size=3000)
    assert r.probe_r2(x[:2000], noise[:2000], x[2000:], noise[2000:]) <= 0.05
    # An embedding: 32 columns spanned by 3 linear functions of x, probed through its components.
    embedding = (x @ rng.normal(size=(12, 3))) @ rng.normal(size=(3, 32)) + 0.01 * rng.normal(size=(3000, 32))
    assert r.probe_r2(x[:2000], embedding[:2000], x[2000:], embedding[2000:]) > 0.99
    assert r.probe_r2(x[:2000], rng.normal(size=(2000, 32)), x[2000:], rng.normal(size=(1000, 32))) <= 0.05


def test_probe_r2_weights_rows() -> None:
    """Heavy rows (30%) follow y = x, light rows y = -x: only the weighted fit learns the heavy rule."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4000, 1))
    heavy = rng.random(4000) < 0.3
    feature = np.where(heavy, 1.0, -1.0) * x[:, 0] + 0.05 * rng.normal(size=4000)
    weights = np.where(heavy, 100.0, 1.0)
    train, test = slice(0, 3000), slice(3000, None)
    weighted = r.probe_r2(x[train], feature[train], x[test], feature[test], weights[train], weights[test])
    unweighted = r.probe_r2(x[train], feature[train], x[test], feature[test], None, weights[test])
    assert weighted > 0.85  # the light rows (weight 1) still miss in the weighted test R²
    assert unweighted < 0  # fitted to the light majority: worse than the mean on heavy rows


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_standalone_auc_of_a_score_is_its_auc(sign: float) -> None:
    rng = np.random.default_rng(3)
    score = rng.normal(size=2000)
    labels = aggregated_labels(rng, -3 + sign * 0.8 * score)
    train, test = np.arange(1500), np.arange(1500, 2000)
    got = r.standalone_auc(score[train], labels.subset(train), score[test], labels.subset(test))
    # metrics.auc clips to (EPS, 1 - EPS), so compare on a sigmoid of the signed score.
    expected = metrics.auc(labels.subset(test), 1 / (1 + np.exp(-sign * score[test])))
    assert got == pytest.approx(expected, abs=1e-12)
    assert got > 0.6


def test_standalone_auc_of_an_embedding_finds_the_informative_direction() -> None:
    rng = np.random.default_rng(4)
    embedding = rng.normal(size=(3000, 16))
    labels = aggregated_labels(rng, -3 + embedding[:, 5] - embedding[:, 9])
    train, test = np.arange(2000), np.arange(2000, 3000)
    got = r.standalone_auc(embedding[train], labels.subset(train), embedding[test], labels.subset(test))
    truth = metrics.auc(labels.subset(test), 1 / (1 + np.exp(-(embedding[test, 5] - embedding[test, 9]))))
    assert got == pytest.approx(truth, abs=0.01)


def test_e0_design_matrix_one_hot_and_standardised_dense() -> None:
    n = 6
    data = Tensors(
        categorical=torch.tensor([[1, 0], [2, 1], [1, 1], [0, 2], [2, 2], [1, 0]]),
        dense=torch.tensor([[0.0], [2.0], [4.0], [6.0], [100.0], [200.0]]),
        cascade=(),
        impressions=torch.ones(n),
        clicks=torch.zeros(n),
        text_index=torch.arange(n),
        texts=[],
        split=np.array(["train"] * 4 + ["test"] * 2, dtype=object),
        groups=np.zeros(n, dtype=object),
        impression_id=np.arange(n).astype(str),
    )
    x = r.e0_design_matrix(data, np.array([0, 3, 5])).toarray()
    assert x.shape == (3, 3 + 3 + 1)
    np.testing.assert_array_equal(x[:, :6], [[0, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 1], [0, 1, 0, 1, 0, 0]])
    # Standardised with the training split's mean 3 and std sqrt(5).
    np.testing.assert_allclose(x[:, 6], (np.array([0.0, 6.0, 200.0]) - 3) / np.sqrt(5))


def test_subsample_is_seeded_capped_and_ordered() -> None:
    rows = np.arange(100, 200)
    assert r.subsample(rows, 500, 0) is rows
    a, b = r.subsample(rows, 10, 7), r.subsample(rows, 10, 7)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 10 and np.all(np.diff(a) > 0) and set(a) <= set(rows)
    assert not np.array_equal(a, r.subsample(rows, 10, 8))


def test_measure_feature_separates_a_redundant_feature_from_a_new_one() -> None:
    rng = np.random.default_rng(5)
    n = 3000
    inputs = rng.normal(size=(n, 6))
    representation = np.tanh(inputs @ rng.normal(size=(6, 8)))
    new_signal = rng.normal(size=n)
    labels = aggregated_labels(rng, -3 + inputs[:, 0] + new_signal)
    train, test = np.arange(2000), np.arange(2000, n)
    delta = {
        "delta_auc": 0.01,
        "delta_auc_ci": [0.005, 0.015],
        "delta_rig": 0.002,
        "delta_rig_ci": [0.0, 0.004],
    }

    def measure(feature: np.ndarray) -> r.FeatureRedundancy:
        return r.measure_feature(
            "frozen",
            r.TrainTest(feature[train], feature[test]),
            r.TrainTest(labels.subset(train), labels.subset(test)),
            r.TrainTest(inputs[train], inputs[test]),
            r.TrainTest(representation[train], representation[test]),
            delta,
            max_rows=1500,
        )

    redundant, new = measure(inputs[:, 0] + 0.01 * rng.normal(size=n)), measure(new_signal)
    assert redundant.explained_fraction > 0.95 and new.explained_fraction < 0.05
    assert redundant.explained_fraction_representation > new.explained_fraction_representation
    assert redundant.cka > new.cka
    assert new.rows == {"train": 1500, "test": 1000, "test_standalone_auc": 1000}
    assert redundant.to_dict()["delta_auc_ci"] == [0.005, 0.015] and redundant.delta_gauc is None
    with pytest.raises(ValueError, match="kind"):
        zeros = r.TrainTest(np.zeros(1), np.zeros(1))
        r.measure_feature("other", zeros, r.TrainTest(labels, labels), zeros, zeros, {})


def test_e2_curve_reads_each_form_against_the_peak_auc_checkpoint() -> None:
    def point(name: str, auc: float, score: tuple[float, float, float], vector: tuple[float, float, float]):
        forms = {}
        for form, (valid_gain, delta_auc, delta_rig) in (("score", score), ("vector", vector)):
            forms[form] = {"standalone_auc": auc, "delta_auc": delta_auc, "delta_rig": delta_rig}
            forms[form]["valid_delta_auc"] = valid_gain
        return {"checkpoint": name, "valid_auc_standalone": auc, "chosen": name == "step-20", **forms}

    points = [
        point("step-0", 0.60, (0.004, 0.004, 0.001), (0.001, 0.002, 0.000)),
        point("step-20", 0.66, (0.002, 0.002, 0.003), (0.003, 0.001, 0.002)),
        point("step-40", 0.64, (0.001, 0.001, 0.000), (0.002, 0.003, 0.001)),
    ]
    curve = r.e2_curve(points)
    assert curve["peak_auc_checkpoint"] == "step-20" and curve["valid_auc_rising_at_end"] is False
    score, vector = curve["forms"]["score"], curve["forms"]["vector"]
    assert score["best_valid_feature_checkpoint"] == "step-0" and not score["peak_auc_is_best_feature"]
    assert score["best_test_delta_rig_checkpoint"] == "step-20"
    assert vector["best_valid_feature_checkpoint"] == "step-20" and vector["peak_auc_is_best_feature"]
    assert vector["best_test_delta_auc_checkpoint"] == "step-40"
    assert r.e2_curve(points[:2])["valid_auc_rising_at_end"] is True


def test_e0_representation_is_the_penultimate_layer_in_row_order() -> None:
    torch.manual_seed(0)
    model = CtrModel(InputShape(vocab_sizes=(4,), dense_dim=2), NetConfig(hidden=(8, 5), dropout=0.5))
    n = 7
    data = Tensors(
        categorical=torch.randint(0, 4, (n, 1)),
        dense=torch.randn(n, 2),
        cascade=(),
        impressions=torch.ones(n),
        clicks=torch.zeros(n),
        text_index=torch.arange(n),
        texts=[],
        split=np.array(["train"] * n, dtype=object),
        groups=np.zeros(n, dtype=object),
        impression_id=np.arange(n).astype(str),
    )
    rows = np.array([5, 0, 3])
    got = r.e0_representation(model, data, rows, batch_size=2)
    model.eval()
    with torch.no_grad():
        expected = model.penultimate(data.categorical[rows], data.dense[rows]).numpy()
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
