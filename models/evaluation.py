"""Test-split reports: one model's metrics, and a model's paired delta over a baseline.

Both resample the same group bootstrap (`metrics.Draws`), so a run's CI and its delta's CI come
from the same draws; `EvaluationConfig` is the run configuration's `evaluation:` section.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypedDict

import numpy as np

from nlpctr.config_files import check_integer
from nlpctr.models import metrics


@dataclass(frozen=True)
class EvaluationConfig:
    """`evaluation:`: the test report's bootstrap and calibration."""

    bootstrap_rounds: int = 1000
    bootstrap_seed: int = 0
    calibration_bins: int = 15

    def __post_init__(self) -> None:
        check_integer("evaluation.bootstrap_rounds", self.bootstrap_rounds)
        check_integer("evaluation.calibration_bins", self.calibration_bins)
        check_integer("evaluation.bootstrap_seed", self.bootstrap_seed, low=0)


class Calibration(TypedDict):
    """Predicted over observed CTR, the ECE and the reliability curve (`metrics.calibration_bins`)."""

    ratio: float
    ece: float
    curve: list[dict[str, float]]


class MetricReport(TypedDict):
    """One model's test metrics (`metric_report`; streamed: `StreamingMetrics.report`)."""

    rows: int
    impressions: int
    clicks: int
    auc: float
    auc_ci: list[float]
    gauc: float
    gauc_ci: list[float]
    logloss: float
    rig: float
    rig_ci: list[float]
    calibration: Calibration


class PairedDelta(TypedDict):
    """A model over a baseline on the same rows (`paired_delta`); `significant` is the AUC's."""

    delta_auc: float
    delta_auc_ci: list[float]
    delta_auc_significant: bool
    delta_rig: float
    delta_rig_ci: list[float]
    delta_rig_significant: bool
    delta_gauc: float
    delta_gauc_ci: list[float]
    delta_gauc_significant: bool
    significant: bool


def metric_report(
    labels: metrics.Labels, predictions: np.ndarray, train_ctr: float, evaluation: EvaluationConfig
) -> MetricReport:
    """AUC, GAUC, log loss, RIG (with group-bootstrap CIs) and calibration of one split."""
    draws = metrics.Draws.for_labels(labels, evaluation.bootstrap_rounds, evaluation.bootstrap_seed)
    result = metrics.resample(labels, predictions, draws)
    auc, rig, gauc = (metrics.Interval.of(*result.value(m, train_ctr)) for m in ("auc", "rig", "gauc"))
    bins = evaluation.calibration_bins
    return {
        "rows": len(predictions),
        "impressions": int(labels.impressions.sum()),
        "clicks": int(labels.clicks.sum()),
        "auc": auc.estimate,
        "auc_ci": auc.as_list(),
        "gauc": gauc.estimate,
        "gauc_ci": gauc.as_list(),
        "logloss": metrics.logloss(labels, predictions),
        "rig": rig.estimate,
        "rig_ci": rig.as_list(),
        "calibration": {
            "ratio": metrics.calibration_ratio(labels, predictions),
            "ece": metrics.ece(labels, predictions, bins),
            "curve": metrics.calibration_bins(labels, predictions, bins),
        },
    }


def paired_delta(
    labels: metrics.Labels,
    predictions: np.ndarray,
    baseline: np.ndarray,
    train_ctr: float,
    evaluation: EvaluationConfig,
) -> PairedDelta:
    """ΔAUC, ΔRIG, ΔGAUC of a model over a baseline on the same rows, paired group bootstrap."""
    draws = metrics.Draws.for_labels(labels, evaluation.bootstrap_rounds, evaluation.bootstrap_seed)
    model, base = (metrics.resample(labels, p, draws) for p in (predictions, baseline))
    intervals = {}
    for metric in ("auc", "rig", "gauc"):
        (estimate, values), (base_estimate, base_values) = (r.value(metric, train_ctr) for r in (model, base))
        intervals[metric] = metrics.Interval.of(estimate - base_estimate, values - base_values)
    return delta_fields(intervals)


def delta_fields(intervals: Mapping[str, metrics.Interval]) -> PairedDelta:
    """`delta_<metric>`, `_ci`, `_significant` of the `auc`, `rig` and `gauc` intervals."""
    auc, rig, gauc = intervals["auc"], intervals["rig"], intervals["gauc"]
    return {
        "delta_auc": auc.estimate,
        "delta_auc_ci": auc.as_list(),
        "delta_auc_significant": auc.significant,
        "delta_rig": rig.estimate,
        "delta_rig_ci": rig.as_list(),
        "delta_rig_significant": rig.significant,
        "delta_gauc": gauc.estimate,
        "delta_gauc_ci": gauc.as_list(),
        "delta_gauc_significant": gauc.significant,
        "significant": auc.significant,
    }


def delta_summary(baseline: str, delta: PairedDelta) -> str:
    """The `; ΔAUC vs RUN ...` clause of a one-line summary."""
    lo, hi = delta["delta_auc_ci"]
    return (
        f"; ΔAUC vs {baseline} {delta['delta_auc']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        f"{' (significant)' if delta['significant'] else ''}"
    )
