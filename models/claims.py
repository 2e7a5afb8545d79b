"""The paper's claims, each a paired difference with a CI and a verdict that follows from the CI.

A claim says which side of zero it expects (`side`: +1 for "greater", -1 for "smaller").
"holds" needs the CI to exclude 0 on that side, "contradicted" needs it to exclude 0 on the
other side, and anything else is "not significant": the point estimate never decides. Each claim
compares two features in one form (`score` or `vector`, `models.nlp_features`) at one width.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Literal, TypedDict

from nlpctr.models.evaluation import PairedDelta

if TYPE_CHECKING:  # (increments trains models; this module only reads what they left)
    from nlpctr.models.increments import FeatureJudge

HOLDS, NOT_SIGNIFICANT, CONTRADICTED = "holds", "not significant", "contradicted"
Verdict = Literal["holds", "not significant", "contradicted"]

PEAK_AUC_NOT_BEST = "peak_auc_checkpoint_not_best_feature"
JOINT_BEATS_FINETUNED = "joint_feature_beats_finetuned_feature"
SUKD_BEATS_FEATUREKD = "sukd_beats_featurekd"
SUKD_BEATS_NOKD = "sukd_beats_nokd"
# Controls: each learned part against its simpler control (not the paper's claims).
LM_STAGE_BEATS_PROBE = "lm_stage_beats_probe"
JOINT_FEATURE_BEATS_PROBE_FEATURE = "joint_feature_beats_probe_feature"


def verdict(ci: Sequence[float], side: int = 1) -> Verdict:
    """What a CI says of a claim that the difference lies on `side` of zero.

    Args:
        ci: the difference's confidence interval (low, high).
        side: +1 when the claim is that the difference is positive, -1 negative.

    Returns:
        HOLDS when the CI lies on `side` of zero, CONTRADICTED when it lies on the other side,
        else NOT_SIGNIFICANT.

    Raises:
        ValueError: `side` is not +1 or -1.
    """
    if side not in (1, -1):
        raise ValueError(f"side is +1 or -1, not {side}")
    low, high = (side * ci[0], side * ci[1])
    low, high = min(low, high), max(low, high)
    if low > 0:
        return HOLDS
    if high < 0:
        return CONTRADICTED
    return NOT_SIGNIFICANT


class ClaimDetail(TypedDict, total=False):
    """What a claim compared: the two features (and how they were chosen) at one width."""

    dim: int  # the width both features reach E0 at
    best_feature_checkpoint: str
    peak_auc_checkpoint: str
    same_checkpoint: bool
    valid_delta_auc: dict[str, float]  # E2's checkpoints' validation gains
    joint_feature: str
    finetuned_feature: str
    probe_feature: str
    layers: int  # the students' depth
    sukd: str
    other: str


class ClaimRecord(TypedDict):
    """A `Claim` in results.json (`claims`, and the feature controls of `controls`)."""

    id: str
    form: str
    statement: str
    estimate: float
    ci: list[float]
    verdict: Verdict
    delta_rig: float | None
    delta_rig_ci: list[float] | None
    detail: ClaimDetail


@dataclass(frozen=True)
class Claim:
    """One claim: a paired ΔAUC with its CI (ΔRIG beside it) and the verdict of the AUC's CI."""

    id: str
    form: str  # the form both features reach E0 in (score or vector)
    statement: str
    estimate: float
    ci: tuple[float, float]
    verdict: Verdict
    delta_rig: float | None = None
    delta_rig_ci: tuple[float, float] | None = None
    detail: ClaimDetail = field(default_factory=ClaimDetail)

    def to_dict(self) -> ClaimRecord:
        out = asdict(self)
        out["ci"] = list(self.ci)
        out["delta_rig_ci"] = list(self.delta_rig_ci) if self.delta_rig_ci is not None else None
        return ClaimRecord(**out)


def from_delta(
    claim_id: str,
    statement: str,
    delta: PairedDelta,
    side: int = 1,
    detail: ClaimDetail | None = None,
    form: str = "score",
) -> Claim:
    """A claim from a paired delta (`models.evaluation.paired_delta` fields: delta_auc, _ci, ...)."""
    ci = (float(delta["delta_auc_ci"][0]), float(delta["delta_auc_ci"][1]))
    rig_ci = delta.get("delta_rig_ci")
    return Claim(
        id=claim_id,
        form=form,
        statement=statement,
        estimate=float(delta["delta_auc"]),
        ci=ci,
        verdict=verdict(ci, side),
        delta_rig=float(delta["delta_rig"]) if delta.get("delta_rig") is not None else None,
        delta_rig_ci=(float(rig_ci[0]), float(rig_ci[1])) if rig_ci is not None else None,
        detail=ClaimDetail(**(detail or {})),
    )


def _compare(
    judge: FeatureJudge, form: str, claim_id: str, statement: str, a: str, b: str, detail: ClaimDetail
) -> Claim:
    """Feature `a` against feature `b` in `form`, added to E0 each; both must reach E0 at one width."""
    key_a, key_b = f"{a}/{form}", f"{b}/{form}"
    if judge.dims[key_a] != judge.dims[key_b]:
        raise ValueError(f"{claim_id}: {key_a} is {judge.dims[key_a]}-d, {key_b} {judge.dims[key_b]}-d")
    detail = ClaimDetail(**{**detail, "dim": judge.dims[key_a]})
    return from_delta(claim_id, statement, judge.paired(key_a, key_b), detail=detail, form=form)


def protocol_claims(
    judge: FeatureJudge,
    e2_peak: str,
    teacher: str,
    students: Iterable[int],
    forms: Sequence[str] = ("score", "vector"),
) -> list[Claim]:
    """The paper's claims, each judged on two features' increments over E0 in one form (`judge`).

    Args:
        judge: the features measured so far (`<feature>/<form>` increments, validation gains, widths).
        e2_peak: E2's peak-standalone-AUC checkpoint folder (`step-<k>`).
        teacher: E4's teacher run (a joint run's feature name).
        students: the distilled depths; a depth counts when its students were measured.
        forms: the forms to decide each claim in.

    Returns:
        One claim per form (and per depth for the distillation claims).

    Raises:
        ValueError: when two compared features reach E0 at different widths.
    """
    students = list(students)
    peak = f"cascade_finetuned@{e2_peak}"  # E2's checkpoint at peak standalone valid AUC
    checkpoints = sorted(
        {key.rsplit("/", 1)[0] for key in judge.increments if key.startswith("cascade_finetuned@")},
        key=lambda name: int(name.rsplit("-", 1)[1]),
    )
    out = []
    for form in forms:
        compare = partial(_compare, judge, form)

        gains = {name: judge.valid_gain[f"{name}/{form}"] for name in checkpoints}
        best = max(checkpoints, key=lambda name: gains[name])  # ties: the earliest
        out.append(
            compare(
                PEAK_AUC_NOT_BEST,
                "E2's checkpoint with the best validation feature gain adds more to E0 than its "
                "peak-standalone-AUC checkpoint",
                best,
                peak,
                {
                    "best_feature_checkpoint": best,
                    "peak_auc_checkpoint": peak,
                    "same_checkpoint": best == peak,
                    "valid_delta_auc": gains,
                },
            )
        )
        out.append(
            compare(
                JOINT_BEATS_FINETUNED,
                "the joint LM's feature adds more to E0 than the E2 (peak-AUC) feature, both fed the "
                "cascaded way",
                teacher,
                peak,
                {"joint_feature": teacher, "finetuned_feature": peak},
            )
        )
        for layers in students:
            sukd, featurekd, nokd = (f"{m}_L{layers}" for m in ("sukd", "featurekd", "nokd"))
            for claim_id, other, method in (
                (SUKD_BEATS_FEATUREKD, featurekd, "feature-KD"),
                (SUKD_BEATS_NOKD, nokd, "no-KD"),
            ):
                if f"{sukd}/{form}" in judge.increments and f"{other}/{form}" in judge.increments:
                    out.append(
                        compare(
                            claim_id,
                            f"the {layers}-layer SuKD student's feature adds more to E0 than the "
                            f"{layers}-layer {method} student's",
                            sukd,
                            other,
                            {"layers": layers, "sukd": sukd, "other": other},
                        )
                    )
    return out
