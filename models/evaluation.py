"""Test-split reports: one model's metrics, and a model's paired delta over a baseline.

Both resample the same group bootstrap (`metrics.Draws`), so a run's CI and its delta's CI come
from the same draws; `EvaluationConfig` is the run configuration's `evaluation:` section.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

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


def metric_report(
    labels: metrics.Labels, predictions: np.ndarray, train_ctr: float, evaluation: EvaluationConfig
) -> dict[str, Any]:
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
) -> dict[str, Any]:
    """ΔAUC, ΔRIG, ΔGAUC of a model over a baseline on the same rows, paired group bootstrap."""
    draws = metrics.Draws.for_labels(labels, evaluation.bootstrap_rounds, evaluation.bootstrap_seed)
    model, base = (metrics.resample(labels, p, draws) for p in (predictions, baseline))
    intervals = {}
    for metric in ("auc", "rig", "gauc"):
        (estimate, values), (base_estimate, base_values) = (r.value(metric, train_ctr) for r in (model, base))
        intervals[metric] = metrics.Interval.of(estimate - base_estimate, values - base_values)
    return delta_fields(intervals)


def delta_fields(intervals: Mapping[str, metrics.Interval]) -> dict[str, Any]:
    """`delta_<metric>`, `_ci`, `_significant` per interval; `significant` is the AUC's."""
    out: dict[str, Any] = {}
    for name, interval in intervals.items():
        out[f"delta_{name}"] = interval.estimate
        out[f"delta_{name}_ci"] = interval.as_list()
        out[f"delta_{name}_significant"] = interval.significant
    out["significant"] = intervals["auc"].significant
    return out


def delta_summary(baseline: str, delta: Mapping[str, Any]) -> str:
    """The `; ΔAUC vs RUN ...` clause of a one-line summary."""
    lo, hi = delta["delta_auc_ci"]
    return (
        f"; ΔAUC vs {baseline} {delta['delta_auc']:+.4f} [{lo:+.4f}, {hi:+.4f}]"
        f"{' (significant)' if delta['significant'] else ''}"
    )
