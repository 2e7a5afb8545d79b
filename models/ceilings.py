"""Ceilings: how much of the achievable text gain a model or an NLP feature recovers.

A ΔAUC of +0.002 means nothing until it is set against the most that text could add: the
Bayes and no-text oracles on simulated data (from `<stem>.truth.parquet`), the split-half
ceiling on real data (`split_half.py`), each with a paired group-bootstrap CI. Called by
`models/increments.py` (and `sweep`). Definitions: docs/DESIGN.md, "The measures" (Ceilings)
and "Modules in detail", ceilings.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nlpctr.errors import UserError
from nlpctr.layout import IMPRESSIONS, read_manifest
from nlpctr.models import metrics
from nlpctr.models.evaluation import EvaluationConfig
from nlpctr.models.split_half import (
    DEFAULT_PRIOR_STRENGTH,
    SplitHalfCeiling,
    SplitHalfEstimates,
    SplitHalfSummary,
    split_half_ceiling,
    split_half_keys,
)

TRUTH_SUFFIX = ".truth.parquet"
NEAR_NO_TEXT_RATIO = 0.9  # E0 is "near its no-text oracle" when its RIG is >= 90% of that oracle's
SHARE_METRICS = ("rig", "auc")  # a model's share of the text gain is given on these


class CeilingCard(TypedDict):
    """An oracle's test metrics, each with its group-bootstrap CI."""

    auc: float | None
    auc_ci: list[float] | None
    logloss: float | None
    logloss_ci: list[float] | None
    rig: float | None
    rig_ci: list[float] | None
    gauc: float | None
    gauc_ci: list[float] | None


class NearNoTextOracle(TypedDict):
    """Whether E0 is near the no-text oracle (`OracleCeiling.near_no_text_oracle`)."""

    e0_near_no_text_oracle: bool
    e0_rig_over_no_text_oracle_rig: float | None
    e0_near_criterion: str


class OracleSummary(TypedDict):
    """`OracleCeiling.summary`: the oracles, the text gain between them, and (with E0) E0's place."""

    kind: Literal["simulated"]
    oracle: CeilingCard
    no_text_oracle: CeilingCard
    text_gain: dict[str, metrics.Estimate]
    bootstrap: metrics.BootstrapSettings
    e0_share_of_text_gain: NotRequired[dict[str, metrics.Estimate]]
    e0_near_no_text_oracle: NotRequired[bool]  # NearNoTextOracle's
    e0_rig_over_no_text_oracle_rig: NotRequired[float | None]
    e0_near_criterion: NotRequired[str]
    split_half: NotRequired[SplitHalfEstimates]  # `nlpctr ceilings`: the log's split half too
    summary: NotRequired[str]  # `nlpctr ceilings`' one line


CeilingSummary = OracleSummary | SplitHalfSummary  # results.json's `ceilings`


# ------------------------------------------------------------------------------- simulated data


def truth_file_for(source: str | Path) -> Path:
    """Where `nlpctr data simulate` put the truth of the log `source` (`<stem>.truth.parquet`)."""
    source = Path(source)
    return source.with_name(source.name.removesuffix(".parquet") + TRUTH_SUFFIX)


def oracle_probabilities(truth_file: Path, impression_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(true click probability, sigmoid(true logit - text effect)) of each impression id, in order."""
    ids = pa.array(np.asarray(impression_ids, dtype=object), pa.string())
    table = pq.read_table(truth_file, columns=["impression_id", "logit", "text_effect", "click_prob"])
    table = table.filter(pc.is_in(table.column("impression_id"), value_set=ids))
    truth = table.to_pandas().drop_duplicates("impression_id").set_index("impression_id")
    rows = truth.reindex(list(impression_ids))
    missing = int(rows["click_prob"].isna().sum())
    if missing:
        raise ValueError(f"{truth_file} has no truth for {missing} of {len(rows)} impressions")
    no_text = 1.0 / (1.0 + np.exp(-(rows["logit"] - rows["text_effect"]).to_numpy()))
    return rows["click_prob"].to_numpy(), no_text


def _card(result: metrics.Resampled, train_ctr: float, draws: metrics.Draws) -> CeilingCard:
    """{auc, logloss, rig, gauc} with group-bootstrap CIs (`<metric>_ci`)."""
    auc, logloss, rig, gauc = (
        draws.interval(*result.value(metric, train_ctr)) for metric in ("auc", "logloss", "rig", "gauc")
    )
    return {
        "auc": auc["estimate"],
        "auc_ci": auc["ci"],
        "logloss": logloss["estimate"],
        "logloss_ci": logloss["ci"],
        "rig": rig["estimate"],
        "rig_ci": rig["ci"],
        "gauc": gauc["estimate"],
        "gauc_ci": gauc["ci"],
    }


class OracleCeiling:
    """The simulator's ceilings on a split: the Bayes oracle, the no-text oracle, the text gain
    between them, and each model's share of it."""

    kind = "simulated"

    def __init__(
        self,
        labels: metrics.Labels,
        oracle: np.ndarray,
        no_text: np.ndarray,
        e0: np.ndarray | None,
        train_ctr: float,
        rounds: int = 200,
        seed: int = 0,
        level: float = 0.95,
    ) -> None:
        groups = labels.groups if labels.groups is not None else np.arange(len(labels.impressions))
        self.labels, self.train_ctr = labels, float(train_ctr)
        self.draws = metrics.Draws.of(groups, rounds, seed, level)
        self.oracle = metrics.resample(labels, oracle, self.draws)
        self.no_text = metrics.resample(labels, no_text, self.draws)
        self.e0 = None if e0 is None else metrics.resample(labels, e0, self.draws)

    def gain(self, metric: str) -> tuple[float, np.ndarray]:
        """oracle - no-text oracle, on the rows and per round."""
        top, top_draws = self.oracle.value(metric, self.train_ctr)
        bottom, bottom_draws = self.no_text.value(metric, self.train_ctr)
        return top - bottom, top_draws - bottom_draws

    def _share(self, model: metrics.Resampled, base: metrics.Resampled) -> dict[str, metrics.Estimate]:
        out = {}
        for metric in SHARE_METRICS:
            value, values = model.value(metric, self.train_ctr)
            base_value, base_values = base.value(metric, self.train_ctr)
            gain, gains = self.gain(metric)
            out[metric] = self.draws.interval(
                float(metrics.ratio(value - base_value, gain)), metrics.ratio(values - base_values, gains)
            )
        return out

    def share(self, predictions: np.ndarray) -> dict[str, metrics.Estimate]:
        """(model - E0) / (oracle - no-text oracle) on RIG and AUC, {estimate, ci} each."""
        if self.e0 is None:
            raise ValueError("a share of the text gain needs E0's predictions")
        return self._share(metrics.resample(self.labels, predictions, self.draws), self.e0)

    def summary(self) -> OracleSummary:
        out: OracleSummary = {
            "kind": "simulated",
            "oracle": _card(self.oracle, self.train_ctr, self.draws),
            "no_text_oracle": _card(self.no_text, self.train_ctr, self.draws),
            "text_gain": {
                metric: self.draws.interval(*self.gain(metric))
                for metric in ("auc", "rig", "gauc", "logloss")
            },
            "bootstrap": self.draws.settings(),
        }
        if self.e0 is not None:
            # How much of the text gain E0 already has through its IDs (rho = 1: all of it, with
            # enough impressions per ad), and whether it is near the no-text oracle at all.
            out["e0_share_of_text_gain"] = self._share(self.e0, self.no_text)
            out.update(self.near_no_text_oracle())
        return out

    def near_no_text_oracle(self) -> NearNoTextOracle:
        """E0's RIG over the no-text oracle's, and whether it is at least NEAR_NO_TEXT_RATIO."""
        assert self.e0 is not None
        e0_over = metrics.finite_or_none(
            float(metrics.ratio(self.e0.rig(self.train_ctr), self.no_text.rig(self.train_ctr)))
        )
        return {
            "e0_near_no_text_oracle": e0_over is not None and e0_over >= NEAR_NO_TEXT_RATIO,
            "e0_rig_over_no_text_oracle_rig": e0_over,
            "e0_near_criterion": f"E0's test RIG >= {NEAR_NO_TEXT_RATIO:g} x the no-text oracle's RIG",
        }


Ceiling = OracleCeiling | SplitHalfCeiling


def share_estimate(shares: Mapping[str, metrics.Estimate] | None, metric: str) -> float | None:
    """`shares[metric]["estimate"]` of a run's or a feature's `share_of_text_gain`, or None."""
    share = (shares or {}).get(metric)
    return None if share is None else share.get("estimate")


# ------------------------------------------------------------------------------- wiring


def for_split(
    manifest: Mapping[str, Any],
    frame: pd.DataFrame,
    labels: metrics.Labels,
    e0: np.ndarray | None,
    train_ctr: float,
    evaluation: EvaluationConfig,
    seed: int,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
) -> Ceiling:
    """The ceiling of one split's rows (`frame`, `labels` and `e0` in the same row order): the
    simulator's oracles when its truth file sits beside the source, else the split-half ceiling.
    Bootstrap rounds and seed are the run's (`evaluation`), so shares pair with its ΔAUC CIs."""
    rounds, boot_seed = evaluation.bootstrap_rounds, evaluation.bootstrap_seed
    truth = truth_file_for(manifest["source"]) if manifest.get("source") else None
    if truth is not None and truth.is_file():
        oracle, no_text = oracle_probabilities(truth, frame["impression_id"].astype(str).tolist())
        return OracleCeiling(labels, oracle, no_text, e0, train_ctr, rounds, boot_seed)
    group = manifest["group"]
    keys = split_half_keys(manifest, frame)
    return SplitHalfCeiling(frame, labels, e0, group, keys, seed, prior_strength, rounds, boot_seed)


# ------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="nlpctr ceilings",
        description="Ceilings of a prepared split: the simulator's oracles, or the split-half ceiling.",
    )
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset (nlpctr data prepare)")
    parser.add_argument("--split", default="test", choices=("train", "valid", "test"))
    parser.add_argument("--seed", type=int, default=0, help="split-half seed")
    parser.add_argument("--prior-strength", type=float, default=DEFAULT_PRIOR_STRENGTH)
    parser.add_argument("--bootstrap-rounds", type=int, default=200)
    parser.add_argument("--bootstrap-seed", type=int, default=0)
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> CeilingSummary:
    """`nlpctr ceilings --data DIR`: the ceilings of one split, without any trained model."""
    args = parse_args(argv)
    manifest = read_manifest(args.data)
    if args.prior_strength < 0 or args.bootstrap_rounds < 1:
        raise UserError("--prior-strength must be >= 0 and --bootstrap-rounds >= 1")
    table = pq.read_table(args.data / IMPRESSIONS)
    frame = table.filter(pc.equal(table.column("split"), args.split)).to_pandas()
    frame = frame.sort_values("impression_id", kind="stable").reset_index(drop=True)
    if frame.empty:
        raise UserError(f"{args.data} has no {args.split} rows")
    group = manifest["group"]
    labels = metrics.Labels(
        frame["impressions"].to_numpy(np.int64),
        frame["clicks"].to_numpy(np.int64),
        frame[group].fillna("").astype(str).to_numpy(),
    )
    split = manifest["split"]
    train_ctr = split["clicks"]["train"] / max(split["impressions"]["train"], 1)
    evaluation = EvaluationConfig(bootstrap_rounds=args.bootstrap_rounds, bootstrap_seed=args.bootstrap_seed)
    ceiling = for_split(manifest, frame, labels, None, train_ctr, evaluation, args.seed, args.prior_strength)
    out = ceiling.summary()
    if ceiling.kind == "simulated":
        # The split-half ceiling of the simulated log too: how far below the oracle it sits.
        keys = split_half_keys(manifest, frame)
        out["split_half"] = split_half_ceiling(frame, group, keys, args.seed, args.prior_strength)
        o, n = out["oracle"], out["no_text_oracle"]
        out["summary"] = (
            f"{manifest['dataset']} {args.split}: oracle AUC {o['auc']:.4f} RIG {o['rig']:.4f} GAUC "
            f"{o['gauc']:.4f}; no-text oracle AUC {n['auc']:.4f} RIG {n['rig']:.4f} GAUC {n['gauc']:.4f}; "
            f"split-half AUC {out['split_half']['auc']:.4f} GAUC {out['split_half']['gauc']:.4f}"
        )
    else:
        s = out["split_half"]
        out["summary"] = (
            f"{manifest['dataset']} {args.split}: split-half AUC {s['auc']:.4f} GAUC {s['gauc']:.4f} "
            f"(seed {s['seed']}, items = {s['item']}, {s['splittable_impression_share']:.1%} of impressions "
            f"splittable{'' if s['applicable'] else ': does not apply'}); in-sample AUC "
            f"{s['in_sample']['auc']:.4f} GAUC {s['in_sample']['gauc']:.4f}; random AUC "
            f"{s['random']['auc']:.4f} GAUC {s['random']['gauc']:.4f}"
        )
    return out
