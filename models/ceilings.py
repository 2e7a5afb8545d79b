"""Ceilings: how much of the achievable text gain a model or an NLP feature recovers.

A ΔAUC of +0.002 means nothing until it is set against the most that text could add: the
Bayes and no-text oracles on simulated data (from `<stem>.truth.parquet`), the split-half
ceiling on real data, each with a paired group-bootstrap CI. Called by `models/increments.py`
(and `sweep`, `distill`). Definitions: docs/DESIGN.md, "The measures" (Ceilings)
and "Modules in detail", ceilings.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nlpctr.errors import UserError
from nlpctr.layout import IMPRESSIONS, read_manifest
from nlpctr.models import metrics
from nlpctr.models.evaluation import EvaluationConfig

TRUTH_SUFFIX = ".truth.parquet"
DEFAULT_PRIOR_STRENGTH = 10.0  # the default of `nlpctr ctr-stats --prior-strength`
NEAR_NO_TEXT_RATIO = 0.9  # E0 is "near its no-text oracle" when its RIG is >= 90% of that oracle's
MIN_SPLITTABLE_SHARE = 0.5  # a split-half ceiling needs most impressions on items shown twice or more
SHARE_METRICS = {"simulated": ("rig", "auc"), "split_half": ("gauc", "auc")}


def ratio(numerator: np.ndarray | float, denominator: np.ndarray | float) -> np.ndarray:
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


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


def _card(result: metrics.Resampled, train_ctr: float, draws: metrics.Draws) -> dict[str, Any]:
    """{auc, logloss, rig, gauc} with group-bootstrap CIs (`<metric>_ci`)."""
    card: dict[str, Any] = {}
    for metric in ("auc", "logloss", "rig", "gauc"):
        estimate, values = result.value(metric, train_ctr)
        interval = draws.interval(estimate, values)
        card[metric] = interval["estimate"]
        card[f"{metric}_ci"] = interval["ci"]
    return card


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

    def _share(self, model: metrics.Resampled, base: metrics.Resampled) -> dict[str, Any]:
        out = {}
        for metric in SHARE_METRICS[self.kind]:
            value, values = model.value(metric, self.train_ctr)
            base_value, base_values = base.value(metric, self.train_ctr)
            gain, gains = self.gain(metric)
            out[metric] = self.draws.interval(
                float(ratio(value - base_value, gain)), ratio(values - base_values, gains)
            )
        return out

    def share(self, predictions: np.ndarray) -> dict[str, Any]:
        """(model - E0) / (oracle - no-text oracle) on RIG and AUC, {estimate, ci} each."""
        if self.e0 is None:
            raise ValueError("a share of the text gain needs E0's predictions")
        return self._share(metrics.resample(self.labels, predictions, self.draws), self.e0)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
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

    def near_no_text_oracle(self) -> dict[str, Any]:
        """E0's RIG over the no-text oracle's, and whether it is at least NEAR_NO_TEXT_RATIO."""
        assert self.e0 is not None
        e0_over = metrics.finite_or_none(
            float(ratio(self.e0.rig(self.train_ctr), self.no_text.rig(self.train_ctr)))
        )
        return {
            "e0_near_no_text_oracle": e0_over is not None and e0_over >= NEAR_NO_TEXT_RATIO,
            "e0_rig_over_no_text_oracle_rig": e0_over,
            "e0_near_criterion": f"E0's test RIG >= {NEAR_NO_TEXT_RATIO:g} x the no-text oracle's RIG",
        }


# ------------------------------------------------------------------------------- real data


@dataclass(frozen=True)
class SplitHalf:
    """Items (rows, or keys of rows) with their impressions split in two halves, A and B."""

    groups: np.ndarray
    impressions: np.ndarray
    clicks: np.ndarray
    a_impressions: np.ndarray
    a_clicks: np.ndarray
    score: np.ndarray  # half A's CTR, shrunk toward half A's mean CTR
    seed: int
    prior_strength: float

    @property
    def half_b(self) -> tuple[metrics.Labels, np.ndarray]:
        """Half B's labels and the scores of its items (items with no impression in B left out)."""
        impressions = self.impressions - self.a_impressions
        keep = impressions > 0
        labels = metrics.Labels(impressions[keep], (self.clicks - self.a_clicks)[keep], self.groups[keep])
        return labels, self.score[keep]

    @property
    def full(self) -> metrics.Labels:
        return metrics.Labels(self.impressions, self.clicks, self.groups)

    @property
    def splittable_impression_share(self) -> float:
        """Share of impressions on items shown at least twice (the only ones both halves see)."""
        total = float(self.impressions.sum())
        return float(self.impressions[self.impressions >= 2].sum()) / total if total else 0.0


def items_of(frame: pd.DataFrame, group: str, keys: Sequence[str] | None) -> pd.DataFrame:
    """One row per item: each row of an aggregated log (`keys` None), else each (group, *keys)
    key with its rows' impressions and clicks summed. Sorted, so the split is reproducible."""
    if keys is None:
        items = frame[[group, "impressions", "clicks"]].copy()
        if "impression_id" in frame:
            items = items.assign(_order=frame["impression_id"].astype(str).to_numpy())
            items = items.sort_values("_order", kind="stable").drop(columns="_order")
        return items.reset_index(drop=True)
    columns = list(dict.fromkeys([group, *keys]))
    keyed = frame[[*columns, "impressions", "clicks"]].copy()
    for column in columns:
        keyed[column] = keyed[column].fillna("").astype(str)
    items = keyed.groupby(columns, sort=True, as_index=False)[["impressions", "clicks"]].sum()
    return items[[group, "impressions", "clicks"]]


def split_half(
    impressions: np.ndarray,
    clicks: np.ndarray,
    groups: np.ndarray,
    seed: int = 0,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
) -> SplitHalf:
    """Half A gets floor(N/2) of an item's N impressions (one more with probability 1/2 when N is
    odd) and a hypergeometric draw of its clicks; the score is (clicks_A + m p_A) / (N_A + m)."""
    impressions = np.asarray(impressions, dtype=np.int64)
    clicks = np.asarray(clicks, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0]))
    odd = (impressions % 2 == 1) & (rng.random(len(impressions)) < 0.5)
    a_impressions = impressions // 2 + odd
    a_clicks = rng.hypergeometric(clicks, impressions - clicks, a_impressions).astype(np.int64)
    mean = a_clicks.sum() / max(a_impressions.sum(), 1)
    score = (a_clicks + prior_strength * mean) / (a_impressions + prior_strength)
    return SplitHalf(
        np.asarray(groups), impressions, clicks, a_impressions, a_clicks, score, seed, prior_strength
    )


def split_half_ceiling(
    frame: pd.DataFrame,
    group: str,
    keys: Sequence[str] | None = None,
    seed: int = 0,
    prior_strength: float = DEFAULT_PRIOR_STRENGTH,
) -> dict[str, Any]:
    """The split-half ceiling of prepared impressions (one split's rows): AUC and GAUC on half B
    scored by half A, the same in-sample (the full CTR scoring the full labels: optimistic) and
    for random scores (~0.5), with the seed, and whether it applies (most impressions splittable)."""
    items = items_of(frame, group, keys)
    halves = split_half(
        items["impressions"].to_numpy(), items["clicks"].to_numpy(), items[group].astype(str).to_numpy(),
        seed, prior_strength,
    )  # fmt: skip
    labels, score = halves.half_b
    full = halves.full
    shrunk = full.clicks.sum() / max(full.impressions.sum(), 1)
    in_sample = (full.clicks + prior_strength * shrunk) / (full.impressions + prior_strength)
    noise = np.random.default_rng(np.random.SeedSequence([seed, 1])).random(len(score))
    share = halves.splittable_impression_share
    return {
        "auc": metrics.auc(labels, score),
        "gauc": metrics.gauc(labels, score),
        "seed": int(seed),
        "prior_strength": float(prior_strength),
        "items": len(items),
        "item": "row" if keys is None else "(" + ", ".join(dict.fromkeys([group, *keys])) + ")",
        "group": group,
        "half_b_impressions": int(labels.impressions.sum()),
        "splittable_impression_share": share,
        "applicable": share >= MIN_SPLITTABLE_SHARE,
        "in_sample": {"auc": metrics.auc(full, in_sample), "gauc": metrics.gauc(full, in_sample)},
        "random": {"auc": metrics.auc(labels, noise), "gauc": metrics.gauc(labels, noise)},
    }


class SplitHalfCeiling:
    """The split-half ceiling of a real test split, E0's gap to it, and each model's share of the gap."""

    kind = "split_half"

    def __init__(
        self,
        frame: pd.DataFrame,
        labels: metrics.Labels,
        e0: np.ndarray | None,
        group: str,
        keys: Sequence[str] | None = None,
        split_seed: int = 0,
        prior_strength: float = DEFAULT_PRIOR_STRENGTH,
        rounds: int = 200,
        seed: int = 0,
        level: float = 0.95,
    ) -> None:
        if labels.groups is None:
            raise ValueError("a split-half ceiling needs the test rows' groups")
        self.labels = labels
        self.estimates = split_half_ceiling(frame, group, keys, split_seed, prior_strength)
        items = items_of(frame, group, keys)
        halves = split_half(
            items["impressions"].to_numpy(), items["clicks"].to_numpy(), items[group].astype(str).to_numpy(),
            split_seed, prior_strength,
        )  # fmt: skip
        self.draws = metrics.Draws.of(labels.groups.astype(str), rounds, seed, level)
        b_labels, b_score = halves.half_b
        self.ceiling = metrics.resample(b_labels, b_score, self.draws)
        self.e0 = None if e0 is None else metrics.resample(self._labels(), e0, self.draws)

    def _labels(self) -> metrics.Labels:
        labels = self.labels
        return metrics.Labels(labels.impressions, labels.clicks, np.asarray(labels.groups).astype(str))

    def gap(self, metric: str) -> tuple[float, np.ndarray]:
        assert self.e0 is not None
        top, top_draws = self.ceiling.value(metric, 0.5)
        bottom, bottom_draws = self.e0.value(metric, 0.5)
        return top - bottom, top_draws - bottom_draws

    def meaningful(self, metric: str) -> tuple[bool, str | None]:
        """A share of the gap is meaningful when the ceiling applies and is significantly above E0."""
        if not self.estimates["applicable"]:
            return False, (
                f"only {self.estimates['splittable_impression_share']:.1%} of the test impressions are "
                f"on items ({self.estimates['item']}) shown more than once: no split half to score"
            )
        interval = self.draws.interval(*self.gap(metric))
        if interval["ci"] is None or interval["ci"][0] <= 0:
            return False, f"the split-half {metric.upper()} is not significantly above E0's ({interval})"
        return True, None

    def share(self, predictions: np.ndarray) -> dict[str, Any]:
        """(model - E0) / (split-half ceiling - E0) on GAUC and AUC, where meaningful."""
        if self.e0 is None:
            raise ValueError("a share of the ceiling needs E0's predictions")
        model = metrics.resample(self._labels(), predictions, self.draws)
        out: dict[str, Any] = {}
        for metric in SHARE_METRICS[self.kind]:
            ok, reason = self.meaningful(metric)
            if not ok:
                out[metric] = {"estimate": None, "ci": None, "reason": reason}
                continue
            value, values = model.value(metric, 0.5)
            base, base_values = self.e0.value(metric, 0.5)
            gap, gaps = self.gap(metric)
            out[metric] = self.draws.interval(
                float(ratio(value - base, gap)), ratio(values - base_values, gaps)
            )
        return out

    def summary(self) -> dict[str, Any]:
        split = dict(self.estimates)
        for metric in ("auc", "gauc"):
            split[f"{metric}_ci"] = self.draws.interval(*self.ceiling.value(metric, 0.5))["ci"]
        out: dict[str, Any] = {"kind": self.kind, "split_half": split, "bootstrap": self.draws.settings()}
        if self.e0 is not None:
            out["e0_gap"] = {metric: self.draws.interval(*self.gap(metric)) for metric in ("auc", "gauc")}
            out["meaningful"] = {}
            for metric in ("auc", "gauc"):
                ok, reason = self.meaningful(metric)
                out["meaningful"][metric] = ok if ok else {"value": False, "reason": reason}
        return out


Ceiling = OracleCeiling | SplitHalfCeiling


def share_estimate(entry: Mapping[str, Any] | None, metric: str) -> float | None:
    """`entry["share_of_text_gain"][metric]["estimate"]` of a run or feature entry, or None."""
    share = ((entry or {}).get("share_of_text_gain") or {}).get(metric) or {}
    return share.get("estimate")


# ------------------------------------------------------------------------------- wiring


def split_half_keys(manifest: Mapping[str, Any], frame: pd.DataFrame) -> list[str] | None:
    """The item of a split-half: a row of an aggregated log; a (query, ad) key of a binary one."""
    if manifest.get("label_form", manifest["spec"]["label"]["form"]) == "aggregated":
        return None
    has_query = "query_id" in frame and frame["query_id"].notna().any()
    return ["query_id", "ad_id"] if has_query else ["ad_id"]


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


def run(argv: list[str] | None = None) -> dict[str, Any]:
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
