"""CTR metrics that are correct for aggregated rows (impressions, clicks) and binary rows.

An aggregated row is `clicks` positives and `impressions - clicks` negatives with the same
prediction. scikit-learn's weighted metrics take exactly that as two weighted samples per
row, so AUC and log loss are sklearn's own; what sklearn lacks (RIG, calibration ratio, ECE,
GAUC, group bootstrap) is written here once.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NotRequired, TypedDict

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


def binned_aucs(
    cells: np.ndarray,
    bins: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    n_cells: int,
    n_bins: int,
) -> tuple[np.ndarray, np.ndarray]:
    """AUC per cell (a group, or 0 for all rows) from weighted positives/negatives per score bin;
    a bin's positives and negatives count as ties (half). Returns (auc, impressions where the AUC
    is defined else 0). Bins are in [0, n_bins): fine logit bins, or exact score ranks."""
    key = cells.astype(np.int64) * n_bins + bins
    unique, inverse = np.unique(key, return_inverse=True)
    pos = np.bincount(inverse, positives, minlength=len(unique))
    neg = np.bincount(inverse, negatives, minlength=len(unique))
    cell = unique // n_bins
    cum = np.cumsum(neg)
    before = np.r_[0.0, cum][np.searchsorted(cell, cell, side="left")]  # negatives of earlier cells
    below = cum - neg - before  # negatives of the same cell in lower bins
    numerator = np.bincount(cell, pos * (below + 0.5 * neg), minlength=n_cells)
    p_total = np.bincount(cell, pos, minlength=n_cells)
    n_total = np.bincount(cell, neg, minlength=n_cells)
    defined = (p_total > 0) & (n_total > 0)
    aucs = np.where(defined, numerator / np.where(defined, p_total * n_total, 1.0), 0.0)
    return aucs, np.where(defined, p_total + n_total, 0.0)


def gauc(labels: Labels, predictions: np.ndarray) -> float:
    """Impression-weighted mean of per-group AUCs over groups with both clicks and non-clicks."""
    if labels.groups is None:
        raise ValueError("GAUC needs groups")
    _, codes = np.unique(labels.groups, return_inverse=True)
    values, rank = np.unique(np.asarray(predictions, dtype=np.float64), return_inverse=True)
    clicks = labels.clicks.astype(np.float64)
    aucs, weights = binned_aucs(
        codes, rank, clicks, labels.impressions - clicks, int(codes.max(initial=-1)) + 1, n_bins=len(values)
    )
    return float(np.sum(weights * aucs) / weights.sum()) if weights.sum() else float("nan")


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


def group_bootstrap_counts(groups: np.ndarray, rounds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The draws of `group_bootstrap_indices` (same groups, rounds and seed) as counts.

    Returns (the sorted unique groups, a (rounds, groups) array of how many times each group is
    drawn): a resample is then a reweighting of rows by their group's count, which gives every
    metric here the value it has on the concatenated resampled rows.
    """
    rng = np.random.default_rng(seed)
    unique = np.unique(groups)
    counts = np.zeros((rounds, len(unique)), dtype=np.int64)
    for r in range(rounds):
        counts[r] = np.bincount(rng.integers(0, len(unique), size=len(unique)), minlength=len(unique))
    return unique, counts


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

    @classmethod
    def of(cls, estimate: float, values: np.ndarray, level: float = 0.95) -> Interval:
        """The percentile interval of per-round values (NaN rounds ignored)."""
        low, high = np.nanquantile(values, [(1 - level) / 2, (1 + level) / 2])
        return cls(float(estimate), float(low), float(high))


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


def weighted_mean_ci(
    values: np.ndarray, weights: np.ndarray, rounds: int = 200, seed: int = 0, level: float = 0.95
) -> Interval:
    """Weighted mean of per-group values with a group-bootstrap CI (a group drawn k times counts
    k times); the draws are those of `group_bootstrap_indices` with the same seed."""
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(rounds):
        counts = (
            np.bincount(rng.integers(0, len(weights), size=len(weights)), minlength=len(weights)) * weights
        )
        estimates.append(float(np.sum(counts * values) / counts.sum()) if counts.sum() else np.nan)
    low, high = np.nanquantile(estimates, [(1 - level) / 2, (1 + level) / 2])
    estimate = float(np.sum(weights * values) / weights.sum()) if weights.sum() else float("nan")
    return Interval(estimate, float(low), float(high))


# ------------------------------------------------------------------------------- resampling as counts


@dataclass(frozen=True)
class Draws:
    """Group-bootstrap draws as counts: `counts[r, g]` = times group `groups[g]` is drawn in round r."""

    groups: np.ndarray  # sorted unique group ids
    counts: np.ndarray  # (rounds, len(groups))
    seed: int
    level: float = 0.95

    @classmethod
    def of(cls, groups: np.ndarray, rounds: int, seed: int, level: float = 0.95) -> Draws:
        unique, counts = group_bootstrap_counts(np.asarray(groups), rounds, seed)
        return cls(unique, counts, seed, level)

    @classmethod
    def for_labels(cls, labels: Labels, rounds: int, seed: int, level: float = 0.95) -> Draws:
        """Draws of the labels' groups, or of single rows when they have none."""
        groups = labels.groups if labels.groups is not None else np.arange(len(labels.impressions))
        return cls.of(groups, rounds, seed, level)

    @property
    def rounds(self) -> int:
        return int(self.counts.shape[0])

    def codes(self, groups: np.ndarray) -> np.ndarray:
        """Index into `self.groups` of each id; every id must be one of them."""
        groups = np.asarray(groups)
        index = np.searchsorted(self.groups, groups).clip(0, max(len(self.groups) - 1, 0))
        if len(groups) and (len(self.groups) == 0 or np.any(self.groups[index] != groups)):
            raise ValueError("rows of a group the bootstrap draws do not know")
        return index

    def interval(self, estimate: float, values: np.ndarray) -> Estimate:
        """{estimate, ci}: the percentile interval of the per-round values (NaN rounds ignored)."""
        finite = np.asarray(values, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if not math.isfinite(estimate) or len(finite) == 0:
            return {"estimate": finite_or_none(estimate), "ci": None}
        low, high = np.quantile(finite, [(1 - self.level) / 2, (1 + self.level) / 2])
        return {"estimate": float(estimate), "ci": [float(low), float(high)]}

    def settings(self) -> BootstrapSettings:
        return {"rounds": self.rounds, "seed": self.seed, "level": self.level}


class Estimate(TypedDict):
    """An estimate and its percentile CI as results.json holds them (None: not finite, no rounds)."""

    estimate: float | None
    ci: list[float] | None
    reason: NotRequired[str]  # why there is none (a split-half share that is not meaningful)


class BootstrapSettings(TypedDict):
    """The group bootstrap behind a set of `Estimate`s."""

    rounds: int
    seed: int
    level: float


def ratio(numerator: np.ndarray | float, denominator: np.ndarray | float) -> np.ndarray:
    """numerator / denominator elementwise, NaN where the denominator is 0 (a share of no gain)."""
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def finite_or_none(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


@dataclass(frozen=True)
class Resampled:
    """AUC, log loss and GAUC of one prediction vector on its rows, and in every bootstrap round."""

    auc: float
    logloss: float
    gauc: float
    auc_draws: np.ndarray
    logloss_draws: np.ndarray
    gauc_draws: np.ndarray

    def rig(self, train_ctr: float) -> float:
        return 1.0 - self.logloss / entropy(train_ctr)

    def rig_draws(self, train_ctr: float) -> np.ndarray:
        return 1.0 - self.logloss_draws / entropy(train_ctr)

    def value(self, metric: str, train_ctr: float) -> tuple[float, np.ndarray]:
        if metric == "rig":
            return self.rig(train_ctr), self.rig_draws(train_ctr)
        return getattr(self, metric), getattr(self, f"{metric}_draws")


def _rank_auc(rank: np.ndarray, positives: np.ndarray, negatives: np.ndarray, n_ranks: int) -> float:
    """Weighted AUC from exact score ranks; tied scores count half (sklearn's convention)."""
    pos = np.bincount(rank, positives, minlength=n_ranks)
    neg = np.bincount(rank, negatives, minlength=n_ranks)
    total = pos.sum() * neg.sum()
    if total <= 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float(np.sum(pos * (below + 0.5 * neg)) / total)


def resample(labels: Labels, predictions: np.ndarray, draws: Draws) -> Resampled:
    """Metrics of `predictions` on `labels`, and under each round of `draws` (rows reweighted by
    their group's count). Equal to `auc`, `logloss` and `gauc` on the rows,
    and to those metrics on `group_bootstrap_indices`' concatenated resamples in each round."""
    raw = np.asarray(predictions, dtype=np.float64)
    if raw.shape != labels.impressions.shape:
        raise ValueError(f"{len(raw)} predictions for {len(labels.impressions)} rows")
    values, rank = np.unique(raw, return_inverse=True)  # AUCs rank the raw scores, as sklearn does
    p = np.clip(raw, EPS, 1 - EPS)
    positives = labels.clicks.astype(np.float64)
    shown = labels.impressions.astype(np.float64)
    negatives = shown - positives
    loss = -(positives * np.log(p) + negatives * np.log1p(-p))
    has_groups = labels.groups is not None
    codes = draws.codes(labels.groups if has_groups else np.arange(len(p)))
    group_auc, group_weight = binned_aucs(
        codes, rank, positives, negatives, len(draws.groups), n_bins=len(values)
    )
    auc = _rank_auc(rank, positives, negatives, len(values))
    logloss = float(loss.sum() / shown.sum())
    gauc = float(np.sum(group_weight * group_auc) / group_weight.sum()) if has_groups else float("nan")
    if has_groups and group_weight.sum() == 0:
        gauc = float("nan")
    aucs, losses, gaucs = (np.full(draws.rounds, np.nan) for _ in range(3))
    for r, counts in enumerate(draws.counts):
        weight = counts[codes].astype(np.float64)
        aucs[r] = _rank_auc(rank, positives * weight, negatives * weight, len(values))
        n = float(np.sum(weight * shown))
        losses[r] = float(np.sum(weight * loss)) / n if n > 0 else np.nan
        if has_groups:
            w = counts * group_weight
            gaucs[r] = float(np.sum(w * group_auc) / w.sum()) if w.sum() > 0 else np.nan
    return Resampled(auc, logloss, gauc, aucs, losses, gaucs)
