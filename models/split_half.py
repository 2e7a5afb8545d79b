"""The split-half ceiling of real data: how much of an item's CTR its own impressions predict.

Each item's (a row's, or a (query, ad) key's) test impressions are split in two (clicks drawn
hypergeometrically) and one half is scored by the other half's CTR, shrunk toward the mean: an
estimate of what knowing each item's CTR reaches, against which E0's gap and a model's share
are read. Called by `models/ceilings.py` (`for_split`). Definitions: docs/DESIGN.md, "The
measures" (Ceilings) and "Modules in detail", ceilings.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NotRequired, TypedDict

import numpy as np
import pandas as pd

from nlpctr.models import metrics

DEFAULT_PRIOR_STRENGTH = 10.0  # the default of `nlpctr ctr-stats --prior-strength`
MIN_SPLITTABLE_SHARE = 0.5  # a split-half ceiling needs most impressions on items shown twice or more
SHARE_METRICS = ("gauc", "auc")  # a model's share of the gap is given on these


class HalfMetrics(TypedDict):
    auc: float
    gauc: float


class SplitHalfEstimates(TypedDict):
    """`split_half_ceiling`: the ceiling's AUC and GAUC, how it was drawn, and its references."""

    auc: float
    gauc: float
    seed: int
    prior_strength: float
    items: int
    item: str
    group: str
    half_b_impressions: int
    splittable_impression_share: float
    applicable: bool
    in_sample: HalfMetrics
    random: HalfMetrics
    auc_ci: NotRequired[list[float] | None]  # in `SplitHalfCeiling.summary`
    gauc_ci: NotRequired[list[float] | None]


class NotMeaningful(TypedDict):
    value: Literal[False]
    reason: str | None


class SplitHalfSummary(TypedDict):
    """`SplitHalfCeiling.summary`: the ceiling and, with E0, E0's gap to it per metric."""

    kind: Literal["split_half"]
    split_half: SplitHalfEstimates
    bootstrap: metrics.BootstrapSettings
    e0_gap: NotRequired[dict[str, metrics.Estimate]]
    meaningful: NotRequired[dict[str, bool | NotMeaningful]]
    summary: NotRequired[str]  # `nlpctr ceilings`' one line


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
) -> SplitHalfEstimates:
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

    def share(self, predictions: np.ndarray) -> dict[str, metrics.Estimate]:
        """(model - E0) / (split-half ceiling - E0) on GAUC and AUC, where meaningful."""
        if self.e0 is None:
            raise ValueError("a share of the ceiling needs E0's predictions")
        model = metrics.resample(self._labels(), predictions, self.draws)
        out: dict[str, metrics.Estimate] = {}
        for metric in SHARE_METRICS:
            ok, reason = self.meaningful(metric)
            if not ok:
                out[metric] = {"estimate": None, "ci": None, "reason": reason}
                continue
            value, values = model.value(metric, 0.5)
            base, base_values = self.e0.value(metric, 0.5)
            gap, gaps = self.gap(metric)
            out[metric] = self.draws.interval(
                float(metrics.ratio(value - base, gap)), metrics.ratio(values - base_values, gaps)
            )
        return out

    def summary(self) -> SplitHalfSummary:
        split = self.estimates.copy()
        split["auc_ci"] = self.draws.interval(*self.ceiling.value("auc", 0.5))["ci"]
        split["gauc_ci"] = self.draws.interval(*self.ceiling.value("gauc", 0.5))["ci"]
        out: SplitHalfSummary = {
            "kind": "split_half",
            "split_half": split,
            "bootstrap": self.draws.settings(),
        }
        if self.e0 is not None:
            out["e0_gap"] = {metric: self.draws.interval(*self.gap(metric)) for metric in ("auc", "gauc")}
            meaningful: dict[str, bool | NotMeaningful] = {}
            for metric in ("auc", "gauc"):
                ok, reason = self.meaningful(metric)
                meaningful[metric] = ok if ok else {"value": False, "reason": reason}
            out["meaningful"] = meaningful
        return out


def split_half_keys(manifest: Mapping[str, Any], frame: pd.DataFrame) -> list[str] | None:
    """The item of a split-half: a row of an aggregated log; a (query, ad) key of a binary one."""
    if manifest.get("label_form", manifest["spec"]["label"]["form"]) == "aggregated":
        return None
    has_query = "query_id" in frame and frame["query_id"].notna().any()
    return ["query_id", "ad_id"] if has_query else ["ad_id"]
