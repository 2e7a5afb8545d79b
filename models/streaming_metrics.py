"""The metrics of models/metrics.py from batches of predictions, in constant memory per score:
fine logit-bin histograms for the point estimates, 20 bytes a row for the group bootstrap.
The streamed training and evaluation passes (models/streamed_training.py,
pipelines/evaluate.py) accumulate a StreamingMetrics instead of holding every prediction.
"""

from __future__ import annotations

import numpy as np

from nlpctr.models.evaluation import MetricReport
from nlpctr.models.metrics import EPS, Interval, Labels, binned_aucs, entropy, weighted_mean_ci

SCORE_BINS = 1 << 20
LOGIT_RANGE = 16.0  # |logit| beyond this shares the end bins (p < 1.2e-7 or > 1 - 1.2e-7)


def score_bin(predictions: np.ndarray, bins: int = SCORE_BINS) -> np.ndarray:
    """Fine, monotone bins of the logit: scores in one bin count as ties (width 3e-5 in logit)."""
    p = np.clip(np.asarray(predictions, dtype=np.float64), EPS, 1 - EPS)
    logit = np.clip(np.log(p) - np.log1p(-p), -LOGIT_RANGE, LOGIT_RANGE)
    return np.minimum(((logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * bins).astype(np.int64), bins - 1)


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
        return binned_aucs(codes, bins, clicks, impressions - clicks, len(self.group_codes), SCORE_BINS)

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

    def report(self, train_ctr: float, rounds: int, seed: int, calibration_bins: int) -> MetricReport:
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
