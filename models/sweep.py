"""The simulator sweep's analysis: what each rho keeps, the trend of each measure against rho,
and the three predictions docs/RESULTS.md states before the results, each with a verdict.

Predictions: `explained_fraction_rises`, `incremental_gain_falls`, `joint_share_at_least_e2`;
a trend's verdict is an exact one-sided permutation test of Spearman's correlation with rho at
`TREND_ALPHA`. Called by `pipelines/experiment/sweep.py`. The predictions stated in full and the test:
docs/DESIGN.md, "Modules in detail", sweep.py.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import NotRequired, TypedDict

import numpy as np
from scipy import stats

from nlpctr.models import ceilings, claims
from nlpctr.models.ceilings import CeilingSummary
from nlpctr.models.claims import ClaimRecord, Verdict
from nlpctr.models.increments import RedundancyMeasure
from nlpctr.models.results import Control, ExperimentResults, ProtocolDocument, RunEntry

TREND_ALPHA = 0.05
TREND_MEASURES = ("explained_fraction", "explained_fraction_representation", "delta_auc", "delta_rig")
JOINT_VS_E2_FROM_RHO = 0.5
E2_FEATURE = "cascade_finetuned"  # E2's checkpoints are measured as `cascade_finetuned@<folder>`


class SweepEntry(TypedDict):
    """What the sweep keeps of one rho's results (`entry`)."""

    redundancy: dict[str, RedundancyMeasure]
    runs: dict[str, RunEntry]
    e2_chosen: str | None
    claims: list[ClaimRecord]
    controls: list[Control]
    ceilings: NotRequired[CeilingSummary]
    e0_near_no_text_oracle: NotRequired[bool | None]
    e0_rig_over_no_text_oracle_rig: NotRequired[float | None]


class Trend(TypedDict):
    """A measure against rho: its values, Spearman's rho, and whether it is monotone."""

    values: list[float]
    spearman: float
    rises: bool
    falls: bool


class TrendVerdict(TypedDict):
    """A prediction that values move with rho, judged (`trend_verdict`)."""

    values: list[float]
    spearman: float | None
    p: float | None
    verdict: Verdict
    ci_at_last_rho: NotRequired[list[float] | None]  # the gains' (incremental_gain_falls)
    zero_in_ci_at_last_rho: NotRequired[bool | None]


class JointVsE2(TypedDict):
    """At one rho, the joint feature against E2's (joint_share_at_least_e2)."""

    joint_feature: str
    finetuned_feature: str
    delta_rig: float | None
    delta_rig_ci: list[float] | None
    verdict: Verdict


class Prediction(TypedDict):
    """One of the three stated predictions in one form, with its parts and a verdict."""

    id: str
    form: str
    statement: str
    parts: dict[str, TrendVerdict] | dict[str, JointVsE2]
    verdict: Verdict


class RhoVerdict(TypedDict):
    """A claim's or control's estimate, CI and verdict at one rho."""

    estimate: float | None
    ci: list[float] | None
    verdict: Verdict


class SpreadEntry(TypedDict):
    """Values over the seeds at one rho and their summary (with `verdicts`: a claim's or control's)."""

    values: list[float]
    mean: float
    sd: float | None
    min: float
    max: float
    verdicts: NotRequired[list[Verdict]]


SpreadAtRho = dict[str, SpreadEntry | list[int]]  # `seeds`: the seeds; the rest per claim or gain


class SimulatorSection(TypedDict):
    """The sweep's `simulator`: per rho, the trends and the predictions' verdicts."""

    rho: list[float]
    per_rho: dict[str, SweepEntry]
    trends: dict[str, Trend]
    predictions: list[Prediction]
    verdicts_by_rho: dict[str, dict[str, RhoVerdict]]
    seeds: NotRequired[list[int]]  # with extra seeds
    per_seed: NotRequired[dict[str, dict[str, SweepEntry]]]
    spread: NotRequired[dict[str, SpreadAtRho]]


class SweepResults(TypedDict):
    """The sweep's results.json (`--dataset simulated`); `summary` only in what it returns."""

    dataset: str
    seed: int
    quick: bool
    rows: int
    impressions_per_row: int | None
    wall_seconds: float
    simulator: SimulatorSection
    protocol: ProtocolDocument
    summary: NotRequired[str]


def entry(results: ExperimentResults) -> SweepEntry:
    """What the sweep keeps of one rho's protocol: the runs, claims and controls, the redundancy
    of every feature but E2's unchosen checkpoints (its chosen one, the peak-AUC checkpoint, goes
    by `cascade_finetuned`: the chosen step may differ across rho), the ceilings, and whether E0
    is near its no-text oracle (the sweep is sized for it: E0 must know what the IDs can know)."""
    chosen = (results.get("e2_curve") or {}).get("peak_auc_checkpoint")
    redundancy = {}
    for key, measures in results["redundancy"].items():
        feature, form = key.rsplit("/", 1)
        if feature.startswith(f"{E2_FEATURE}@"):
            if feature != f"{E2_FEATURE}@{chosen}":
                continue
            key = f"{E2_FEATURE}/{form}"
        redundancy[key] = measures
    kept: SweepEntry = {
        "redundancy": redundancy,
        "runs": results["runs"],
        "e2_chosen": chosen,
        "claims": results.get("claims") or [],
        "controls": results.get("controls") or [],
    }
    ceiling = results.get("ceilings")
    if ceiling:
        kept["ceilings"] = ceiling
        kept["e0_near_no_text_oracle"] = ceiling.get("e0_near_no_text_oracle")
        kept["e0_rig_over_no_text_oracle_rig"] = ceiling.get("e0_rig_over_no_text_oracle_rig")
    return kept


def _trend(rhos: Sequence[float], values: Sequence[float]) -> Trend:
    return {
        "values": list(values),
        "spearman": float(stats.spearmanr(rhos, values).statistic),
        "rises": bool(all(b >= a for a, b in itertools.pairwise(values))),
        "falls": bool(all(b <= a for a, b in itertools.pairwise(values))),
    }


def trends(per_rho: Mapping[float, SweepEntry]) -> dict[str, Trend]:
    """How each measure moves as rho rises: Spearman's rho, and whether it is monotone."""
    rhos = sorted(per_rho)
    out: dict[str, Trend] = {}
    features = per_rho[rhos[0]]["redundancy"]
    for measure in TREND_MEASURES:
        for feature in features:
            out[f"{feature}:{measure}"] = _trend(
                rhos, [per_rho[r]["redundancy"][feature][measure] for r in rhos]
            )
    for feature in features:  # the share of the text ceiling, on RIG
        shares = [
            ceilings.share_estimate(per_rho[r]["redundancy"][feature].get("share_of_text_gain"), "rig")
            for r in rhos
        ]
        if all(v is not None and np.isfinite(v) for v in shares):
            out[f"{feature}:share_of_text_gain_rig"] = _trend(rhos, shares)
    return out


def spearman_p(x: Sequence[float], y: Sequence[float], side: int) -> float:
    """Exact one-sided p-value of Spearman's correlation (side +1: rises, -1: falls) by
    enumerating every order of y (fine for the few values of rho a sweep has)."""
    n = len(x)
    if n > 8:
        raise ValueError(f"the exact test enumerates n! orders; {n} values is too many")
    observed = side * stats.spearmanr(x, y).statistic
    rank_x, rank_y = stats.rankdata(x), stats.rankdata(y)
    at_least = 0
    for order in itertools.permutations(rank_y):
        at_least += side * stats.pearsonr(rank_x, order).statistic >= observed - 1e-12
    return at_least / math.factorial(n)


def trend_verdict(rhos: Sequence[float], values: Sequence[float], side: int) -> TrendVerdict:
    """{values, spearman, p, verdict} of the prediction that `values` move with rho on `side`."""
    if any(v is None or not np.isfinite(v) for v in values) or len(set(values)) < 2:
        return {"values": list(values), "spearman": None, "p": None, "verdict": claims.NOT_SIGNIFICANT}
    p_predicted, p_other = spearman_p(rhos, values, side), spearman_p(rhos, values, -side)
    verdict = claims.NOT_SIGNIFICANT
    if p_predicted <= TREND_ALPHA:
        verdict = claims.HOLDS
    elif p_other <= TREND_ALPHA:
        verdict = claims.CONTRADICTED
    return {
        "values": [float(v) for v in values],
        "spearman": float(stats.spearmanr(rhos, values).statistic),
        "p": p_predicted,
        "verdict": verdict,
    }


def _overall(verdicts: Sequence[str]) -> Verdict:
    """Every part holds: holds; any part contradicted: contradicted; else not significant."""
    if verdicts and all(v == claims.HOLDS for v in verdicts):
        return claims.HOLDS
    return claims.CONTRADICTED if claims.CONTRADICTED in verdicts else claims.NOT_SIGNIFICANT


def predictions(per_rho: Mapping[float, SweepEntry], form: str = "score") -> list[Prediction]:
    """The three stated predictions (docs/RESULTS.md) against the sweep, for the features in one
    form, each with its parts and a verdict."""
    rhos = sorted(per_rho)

    def series(measure: str, feature: str) -> list[float]:
        return [per_rho[r]["redundancy"][f"{feature}/{form}"][measure] for r in rhos]

    # the click-trained features: E2's chosen checkpoint, then each joint fusion
    features = [k.rsplit("/", 1)[0] for k in per_rho[rhos[0]]["redundancy"] if k.endswith(f"/{form}")]
    joint = sorted(f for f in features if f.startswith("joint_") and f != "joint_probe")
    names = [E2_FEATURE, *joint] if E2_FEATURE in features else joint
    explained = {n: trend_verdict(rhos, series("explained_fraction", n), +1) for n in names}
    gain: dict[str, TrendVerdict] = {}
    for n in ["frozen", *names]:
        gain[n] = trend_verdict(rhos, series("delta_rig", n), -1)
        ci = per_rho[rhos[-1]]["redundancy"][f"{n}/{form}"].get("delta_rig_ci")
        gain[n]["ci_at_last_rho"] = ci
        gain[n]["zero_in_ci_at_last_rho"] = None if ci is None else bool(ci[0] <= 0 <= ci[1])
    joint_vs_e2: dict[str, JointVsE2] = {}
    for r in rhos:
        if r < JOINT_VS_E2_FROM_RHO:
            continue
        claim = next(
            (
                c
                for c in per_rho[r]["claims"]
                if c["id"] == claims.JOINT_BEATS_FINETUNED and c["form"] == form
            ),
            None,
        )
        if claim is None:
            continue
        ci = claim["delta_rig_ci"]
        # ">=": only a CI wholly below 0 contradicts it; one wholly above 0 shows it strictly.
        joint_vs_e2[f"{r:g}"] = {
            "joint_feature": claim["detail"]["joint_feature"],
            "finetuned_feature": claim["detail"]["finetuned_feature"],
            "delta_rig": claim["delta_rig"],
            "delta_rig_ci": ci,
            "verdict": claims.verdict(ci),
        }
    return [
        {
            "id": "explained_fraction_rises",
            "form": form,
            "statement": "E0 explains more of each click-trained NLP feature as rho rises",
            "parts": explained,
            "verdict": _overall([p["verdict"] for p in explained.values()]),
        },
        {
            "id": "incremental_gain_falls",
            "form": form,
            "statement": "every NLP feature's ΔRIG over E0 falls as rho rises, towards 0 at rho = 1",
            "parts": gain,
            "verdict": _overall([p["verdict"] for p in gain.values()]),
        },
        {
            "id": "joint_share_at_least_e2",
            "form": form,
            "statement": "at rho >= 0.5 the joint feature's share of the text ceiling is >= the E2 feature's",
            "parts": joint_vs_e2,
            "verdict": _overall([p["verdict"] for p in joint_vs_e2.values()]),
        },
    ]


def verdicts_by_rho(per_rho: Mapping[float, SweepEntry]) -> dict[str, dict[str, RhoVerdict]]:
    """Every claim's and control's verdict at each rho (`<id>/<form>` -> {rho: {estimate, ci, verdict}})."""
    out: dict[str, dict[str, RhoVerdict]] = {}
    for r in sorted(per_rho):
        for c in [*per_rho[r]["claims"], *per_rho[r].get("controls", [])]:
            if "delta_valid_logloss" in c:
                key, estimate, ci = c["id"], c["delta_valid_logloss"], c["delta_valid_logloss_ci"]
            else:
                key, estimate, ci = f"{c['id']}/{c['form']}", c["estimate"], c["ci"]
                if (c.get("detail") or {}).get("layers") is not None:
                    key += f"/L{c['detail']['layers']}"
            out.setdefault(key, {})[f"{r:g}"] = {"estimate": estimate, "ci": ci, "verdict": c["verdict"]}
    return out


SPREAD_MEASURES = ("delta_rig", "delta_auc")


def spread(
    per_seed: Mapping[int, Mapping[float, SweepEntry]],
) -> dict[str, dict[str, SpreadEntry | list[int]]]:
    """Across seeds, at each rho every seed ran: each control's and claim's estimate and verdict
    per seed, and each feature's gain over E0, with their mean and standard deviation."""
    rhos = sorted(set.intersection(*(set(per_rho) for per_rho in per_seed.values())))
    seeds = sorted(per_seed)
    out: dict[str, SpreadAtRho] = {}
    for r in rhos:
        at_rho: SpreadAtRho = {"seeds": seeds}
        verdicts = [verdicts_by_rho({r: per_seed[s][r]}) for s in seeds]
        for key in verdicts[0]:
            values = [v[key][f"{r:g}"] for v in verdicts if key in v]
            at_rho[key] = _summary([v["estimate"] for v in values]) | {
                "verdicts": [v["verdict"] for v in values]
            }
        for measure in SPREAD_MEASURES:
            for feature in per_seed[seeds[0]][r]["redundancy"]:
                values = [per_seed[s][r]["redundancy"][feature][measure] for s in seeds]
                at_rho[f"{feature}:{measure}"] = _summary(values)
        out[f"{r:g}"] = at_rho
    return out


def _summary(values: Sequence[float]) -> SpreadEntry:
    array = np.asarray(values, dtype=float)
    return {
        "values": [float(v) for v in array],
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if len(array) > 1 else None,
        "min": float(array.min()),
        "max": float(array.max()),
    }
