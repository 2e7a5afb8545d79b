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
from typing import Any

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

    def interval(self, estimate: float, values: np.ndarray) -> dict[str, Any]:
        """{estimate, ci}: the percentile interval of the per-round values (NaN rounds ignored)."""
        finite = np.asarray(values, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        if not math.isfinite(estimate) or len(finite) == 0:
            return {"estimate": finite_or_none(estimate), "ci": None}
        low, high = np.quantile(finite, [(1 - self.level) / 2, (1 + self.level) / 2])
        return {"estimate": float(estimate), "ci": [float(low), float(high)]}

    def settings(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "seed": self.seed, "level": self.level}


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


# ------------------------------------------------------------------------------- streaming

SCORE_BINS = 1 << 20
LOGIT_RANGE = 16.0  # |logit| beyond this shares the end bins (p < 1.2e-7 or > 1 - 1.2e-7)


def score_bin(predictions: np.ndarray, bins: int = SCORE_BINS) -> np.ndarray:
    """Fine, monotone bins of the logit: scores in one bin count as ties (width 3e-5 in logit)."""
    p = np.clip(np.asarray(predictions, dtype=np.float64), EPS, 1 - EPS)
    logit = np.clip(np.log(p) - np.log1p(-p), -LOGIT_RANGE, LOGIT_RANGE)
    return np.minimum(((logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * bins).astype(np.int64), bins - 1)


def binned_aucs(
    cells: np.ndarray,
    bins: np.ndarray,
    positives: np.ndarray,
    negatives: np.ndarray,
    n_cells: int,
    n_bins: int = SCORE_BINS,
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


class StreamingMetrics:
    """The metrics of `metric_report` from batches, without holding predictions or groups.

    Point estimates come from fine score histograms (constant memory): log loss and the
    calibration ratio are exact sums, AUC is exact up to ties within a bin (width 3e-5 in
    logit), ECE and the reliability curve use equal-impression bins cut at fine-bin edges.
    Group-bootstrap CIs and GAUC need each row's group: kept as 20 bytes per row (score bin,
    group code, clicks, impressions, log loss), so a resample is a reweighting of groups with
    the same draws as the in-memory bootstrap.
    """

    def __init__(self) -> None:
        self.positive = np.zeros(SCORE_BINS)
        self.negative = np.zeros(SCORE_BINS)
        self.predicted = np.zeros(SCORE_BINS)  # sum of p * impressions per bin
        self.loss = 0.0  # summed log loss
        self.group_codes: dict[str, int] = {}
        self._chunks: list[tuple[np.ndarray, ...]] = []

    def add(self, labels: Labels, predictions: np.ndarray) -> None:
        groups = labels.groups if labels.groups is not None else np.full(len(predictions), "")
        codes = np.fromiter(
            (self.group_codes.setdefault(g, len(self.group_codes)) for g in groups), np.int32, len(groups)
        )
        self._add(codes, labels.clicks, labels.impressions, predictions)

    def _add(
        self, codes: np.ndarray, clicks: np.ndarray, impressions: np.ndarray, predictions: np.ndarray
    ) -> None:
        p = np.clip(np.asarray(predictions, dtype=np.float64), EPS, 1 - EPS)
        positives = clicks.astype(np.float64)
        shown = impressions.astype(np.float64)
        bins = score_bin(p)
        self.positive += np.bincount(bins, positives, minlength=SCORE_BINS)
        self.negative += np.bincount(bins, shown - positives, minlength=SCORE_BINS)
        self.predicted += np.bincount(bins, p * shown, minlength=SCORE_BINS)
        loss = -(positives * np.log(p) + (shown - positives) * np.log1p(-p))
        self.loss += float(loss.sum())
        self._chunks.append(
            (
                bins.astype(np.int32),
                codes.astype(np.int32),
                clicks.astype(np.int32),
                impressions.astype(np.int32),
                loss,
            )
        )

    def rescored(self, predictions: np.ndarray) -> StreamingMetrics:
        """The same rows (labels and groups, in the order they were added) with other predictions:
        a baseline's, for `paired_delta`."""
        _, codes, clicks, impressions, _ = self._rows()
        if len(predictions) != len(codes):
            raise ValueError(f"{len(predictions)} predictions for {len(codes)} rows")
        other = StreamingMetrics()
        other.group_codes = dict(self.group_codes)
        other._add(codes, clicks, impressions, predictions)
        return other

    def _rows(self) -> tuple[np.ndarray, ...]:
        """Per-row columns with group codes renumbered in sorted group order (the order the
        in-memory bootstrap draws groups in)."""
        bins, codes, clicks, impressions, loss = (np.concatenate(c) for c in zip(*self._chunks, strict=True))
        names = np.array(list(self.group_codes), dtype=object)
        rank = np.empty(len(names), np.int32)
        rank[np.argsort(names, kind="stable")] = np.arange(len(names), dtype=np.int32)
        self._chunks = [(bins, rank[codes], clicks, impressions, loss)]
        self.group_codes = {str(g): i for i, g in enumerate(sorted(names))}
        return self._chunks[0]

    @property
    def impressions(self) -> float:
        return float(self.positive.sum() + self.negative.sum())

    @property
    def clicks(self) -> float:
        return float(self.positive.sum())

    def auc(self) -> float:
        pos, neg = self.positive, self.negative
        below = np.cumsum(neg) - neg
        total = pos.sum() * neg.sum()
        return float(np.sum(pos * (below + 0.5 * neg)) / total) if total else float("nan")

    def logloss(self) -> float:
        return float(self.loss / max(self.impressions, EPS))

    def calibration_ratio(self) -> float:
        return float(self.predicted.sum() / max(self.clicks, EPS))

    def calibration_bins(self, bins: int = 15) -> list[dict[str, float]]:
        """`calibration_bins` with equal-impression bins cut at fine-bin edges."""
        weight = self.positive + self.negative
        cum = np.cumsum(weight)
        edges = np.searchsorted(cum, np.linspace(0, cum[-1], bins + 1)[1:-1], side="left")
        result = []
        for chunk in np.split(np.arange(len(weight)), edges):
            n = float(weight[chunk].sum())
            if n == 0:
                continue
            result.append(
                {
                    "impressions": n,
                    "predicted": float(self.predicted[chunk].sum() / n),
                    "observed": float(self.positive[chunk].sum() / n),
                }
            )
        return result

    def ece(self, bins: int = 15) -> float:
        curve = self.calibration_bins(bins)
        total = sum(b["impressions"] for b in curve)
        return float(sum(b["impressions"] * abs(b["predicted"] - b["observed"]) for b in curve) / total)

    def group_aucs(self) -> tuple[np.ndarray, np.ndarray]:
        """Per group (sorted ids): AUC and impressions, impressions 0 where AUC is undefined."""
        bins, codes, clicks, impressions, _ = self._rows()
        return binned_aucs(codes, bins, clicks, impressions - clicks, len(self.group_codes))

    def _bootstrap_rounds(self, train_ctr: float, rounds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """AUC and RIG of each group-bootstrap round: groups drawn as `bootstrap_ci` draws them,
        rows reweighted by how often their group was drawn."""
        bins, codes, clicks, impressions, loss = self._rows()
        occupied, bins = np.unique(bins, return_inverse=True)  # same order and ties, fewer bins
        n_groups = len(self.group_codes)
        group_loss = np.bincount(codes, loss, minlength=n_groups)
        group_impressions = np.bincount(codes, impressions, minlength=n_groups)
        negatives = (impressions - clicks).astype(np.float64)
        h = entropy(train_ctr)
        rng = np.random.default_rng(seed)
        aucs, rigs = np.empty(rounds), np.empty(rounds)
        for r in range(rounds):
            drawn = np.bincount(rng.integers(0, n_groups, size=n_groups), minlength=n_groups).astype(
                np.float64
            )
            weight = drawn[codes]
            pos = np.bincount(bins, clicks * weight, minlength=len(occupied))
            neg = np.bincount(bins, negatives * weight, minlength=len(occupied))
            total = pos.sum() * neg.sum()
            below = np.cumsum(neg) - neg
            aucs[r] = float(np.sum(pos * (below + 0.5 * neg)) / total) if total else np.nan
            n = float(np.sum(drawn * group_impressions))
            rigs[r] = 1.0 - float(np.sum(drawn * group_loss)) / n / h if n else np.nan
        return aucs, rigs

    def bootstrap(self, train_ctr: float, rounds: int, seed: int, level: float = 0.95) -> dict[str, Interval]:
        """AUC and RIG with group-bootstrap percentile CIs."""
        aucs, rigs = self._bootstrap_rounds(train_ctr, rounds, seed)
        estimates = {"auc": self.auc(), "rig": 1.0 - self.logloss() / entropy(train_ctr)}
        return {
            name: Interval.of(estimates[name], values, level)
            for name, values in (("auc", aucs), ("rig", rigs))
        }

    def paired_delta(
        self, baseline: StreamingMetrics, train_ctr: float, rounds: int, seed: int, level: float = 0.95
    ) -> dict[str, Interval]:
        """ΔAUC, ΔRIG, ΔGAUC over a baseline scored on the same rows in the same order: both
        resampled with the same group draws (`paired_bootstrap_diff`)."""
        if baseline.group_codes.keys() != self.group_codes.keys() or len(baseline._rows()[0]) != len(
            self._rows()[0]
        ):
            raise ValueError("the baseline was not scored on the same rows")
        aucs, rigs = self._bootstrap_rounds(train_ctr, rounds, seed)
        base_aucs, base_rigs = baseline._bootstrap_rounds(train_ctr, rounds, seed)
        h = entropy(train_ctr)
        group_auc, weights = self.group_aucs()
        return {
            "auc": Interval.of(self.auc() - baseline.auc(), aucs - base_aucs, level),
            "rig": Interval.of((baseline.logloss() - self.logloss()) / h, rigs - base_rigs, level),
            "gauc": weighted_mean_ci(group_auc - baseline.group_aucs()[0], weights, rounds, seed, level),
        }

    def report(self, train_ctr: float, rounds: int, seed: int, calibration_bins: int) -> dict:
        """The keys of `evaluation.metric_report`, streamed."""
        intervals = self.bootstrap(train_ctr, rounds, seed)
        aucs, weights = self.group_aucs()
        gauc = weighted_mean_ci(aucs, weights, rounds, seed)
        rows = sum(len(c[0]) for c in self._chunks)
        return {
            "rows": rows,
            "impressions": int(self.impressions),
            "clicks": int(self.clicks),
            "auc": intervals["auc"].estimate,
            "auc_ci": intervals["auc"].as_list(),
            "gauc": gauc.estimate,
            "gauc_ci": gauc.as_list(),
            "logloss": self.logloss(),
            "rig": intervals["rig"].estimate,
            "rig_ci": intervals["rig"].as_list(),
            "calibration": {
                "ratio": self.calibration_ratio(),
                "ece": self.ece(calibration_bins),
                "curve": self.calibration_bins(calibration_bins),
            },
        }
