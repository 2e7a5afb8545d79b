"""CTR metrics that are correct for aggregated rows (impressions, clicks) and binary rows.

An aggregated row is `clicks` positives and `impressions - clicks` negatives with the same
prediction. scikit-learn's weighted metrics take exactly that as two weighted samples per
row, so AUC and log loss are sklearn's own; what sklearn lacks (RIG, calibration ratio, ECE,
GAUC, group bootstrap) is written here once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7


@dataclass(frozen=True)
class Labels:
    """What was observed for a set of rows: impressions and clicks per row, and its group."""

    impressions: np.ndarray
    clicks: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.impressions.shape != self.clicks.shape:
            raise ValueError("impressions and clicks must have the same shape")
        if np.any(self.clicks > self.impressions) or np.any(self.clicks < 0):
            raise ValueError("need 0 <= clicks <= impressions")

    def subset(self, index: np.ndarray) -> Labels:
        groups = None if self.groups is None else self.groups[index]
        return Labels(self.impressions[index], self.clicks[index], groups)


def _as_samples(labels: Labels, predictions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row -> one positive sample weighted by clicks and one negative weighted by non-clicks."""
    p = np.clip(np.asarray(predictions, dtype=np.float64), EPS, 1 - EPS)
    clicks = labels.clicks.astype(np.float64)
    non_clicks = labels.impressions.astype(np.float64) - clicks
    y = np.concatenate([np.ones_like(p), np.zeros_like(p)])
    return y, np.concatenate([p, p]), np.concatenate([clicks, non_clicks])


def auc(labels: Labels, predictions: np.ndarray) -> float:
    """Impression-weighted ROC AUC; NaN when only one class was observed."""
    y, p, w = _as_samples(labels, predictions)
    keep = w > 0
    if len(np.unique(y[keep])) < 2:
        return float("nan")
    return float(roc_auc_score(y[keep], p[keep], sample_weight=w[keep]))


def logloss(labels: Labels, predictions: np.ndarray) -> float:
    """Impression-weighted binomial log loss (nats per impression)."""
    y, p, w = _as_samples(labels, predictions)
    return float(log_loss(y, p, sample_weight=w, labels=[0, 1]))


def entropy(ctr: float) -> float:
    """Log loss of always predicting `ctr` on data whose CTR is `ctr`."""
    ctr = min(max(ctr, EPS), 1 - EPS)
    return float(-(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr)))


def rig(labels: Labels, predictions: np.ndarray, train_ctr: float) -> float:
    """Relative information gain: 1 - logloss / entropy(train CTR)."""
    return 1.0 - logloss(labels, predictions) / entropy(train_ctr)


def calibration_ratio(labels: Labels, predictions: np.ndarray) -> float:
    """Predicted clicks / observed clicks (1 is calibrated)."""
    predicted = float(np.sum(np.asarray(predictions) * labels.impressions))
    return predicted / max(float(labels.clicks.sum()), EPS)


def calibration_bins(labels: Labels, predictions: np.ndarray, bins: int = 15) -> list[dict[str, float]]:
    """Reliability curve on equal-impression bins of the prediction."""
    p = np.asarray(predictions, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    cum = np.cumsum(labels.impressions[order])
    edges = np.searchsorted(cum, np.linspace(0, cum[-1], bins + 1)[1:-1], side="left")
    result = []
    for chunk in np.split(order, edges):
        if len(chunk) == 0:
            continue
        n = float(labels.impressions[chunk].sum())
        result.append(
            {
                "impressions": n,
                "predicted": float(np.sum(p[chunk] * labels.impressions[chunk]) / n),
                "observed": float(labels.clicks[chunk].sum() / n),
            }
        )
    return result


def ece(labels: Labels, predictions: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error over equal-impression bins, weighted by impressions."""
    curve = calibration_bins(labels, predictions, bins)
    total = sum(b["impressions"] for b in curve)
    return float(sum(b["impressions"] * abs(b["predicted"] - b["observed"]) for b in curve) / total)


def gauc(labels: Labels, predictions: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUCs over groups with both clicks and non-clicks."""
    if labels.groups is None:
        raise ValueError("GAUC needs groups")
    p = np.asarray(predictions)
    order = np.argsort(labels.groups, kind="stable")
    groups = labels.groups[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    total = weighted = 0.0
    for chunk in np.split(order, starts[1:]):
        sub = labels.subset(chunk)
        clicks, impressions = sub.clicks.sum(), sub.impressions.sum()
        if clicks == 0 or clicks == impressions:
            continue
        weighted += impressions * auc(sub, p[chunk])
        total += impressions
    return float(weighted / total) if total else float("nan")


Metric = Callable[[Labels, np.ndarray], float]


def group_bootstrap_indices(groups: np.ndarray, rounds: int, seed: int) -> list[np.ndarray]:
    """Row indices of `rounds` bootstrap resamples that draw whole groups with replacement."""
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    samples = []
    for _ in range(rounds):
        drawn = rng.integers(0, len(unique), size=len(unique))
        samples.append(np.concatenate([members[g] for g in drawn]))
    return samples


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval excludes zero (for a difference)."""
        return self.low > 0 or self.high < 0

    def as_list(self) -> list[float]:
        return [self.low, self.high]


def _percentile_interval(
    statistic: Callable[[np.ndarray], float], labels: Labels, rounds: int, seed: int, level: float
) -> Interval:
    """Percentile CI of statistic(row indices), resampling groups (rows when there are none)."""
    groups = labels.groups if labels.groups is not None else np.arange(len(labels.impressions))
    values = [statistic(idx) for idx in group_bootstrap_indices(groups, rounds, seed)]
    low, high = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
    return Interval(statistic(np.arange(len(labels.impressions))), float(low), float(high))


def bootstrap_ci(
    metric: Metric,
    labels: Labels,
    predictions: np.ndarray,
    rounds: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Percentile CI of a metric, resampling groups (rows when there are no groups)."""
    return _percentile_interval(
        lambda idx: metric(labels.subset(idx), predictions[idx]), labels, rounds, seed, level
    )


def paired_bootstrap_diff(
    metric: Metric,
    labels: Labels,
    predictions_a: np.ndarray,
    predictions_b: np.ndarray,
    rounds: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """CI of metric(a) - metric(b) on the same resampled groups for both models."""

    def diff(idx: np.ndarray) -> float:
        sub = labels.subset(idx)
        return metric(sub, predictions_a[idx]) - metric(sub, predictions_b[idx])

    return _percentile_interval(diff, labels, rounds, seed, level)
