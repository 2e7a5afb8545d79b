"""The paper's claims, each a paired difference with a CI and a verdict that follows from the CI.

A claim says which side of zero it expects (`side`: +1 for "greater", -1 for "smaller").
"holds" needs the CI to exclude 0 on that side, "contradicted" needs it to exclude 0 on the
other side, and anything else is "not significant": the point estimate never decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # (increments trains models; this module only reads what they left)
    from nlpctr.models.increments import FeatureJudge

HOLDS, NOT_SIGNIFICANT, CONTRADICTED = "holds", "not significant", "contradicted"
Verdict = Literal["holds", "not significant", "contradicted"]

PEAK_AUC_NOT_BEST = "peak_auc_checkpoint_not_best_feature"
JOINT_BEATS_FINETUNED = "joint_feature_beats_finetuned_feature"
SUKD_BEATS_FEATUREKD = "sukd_beats_featurekd"


def verdict(ci: Sequence[float], side: int = 1) -> Verdict:
    """What a CI says of a claim that the difference lies on `side` of zero."""
    if side not in (1, -1):
        raise ValueError(f"side is +1 or -1, not {side}")
    low, high = (side * ci[0], side * ci[1])
    low, high = min(low, high), max(low, high)
    if low > 0:
        return HOLDS
    if high < 0:
        return CONTRADICTED
    return NOT_SIGNIFICANT


@dataclass(frozen=True)
class Claim:
    """One claim: a paired ΔAUC with its CI (ΔRIG beside it) and the verdict of the AUC's CI."""

    id: str
    statement: str
    estimate: float
    ci: tuple[float, float]
    verdict: Verdict
    delta_rig: float | None = None
    delta_rig_ci: tuple[float, float] | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ci"] = list(self.ci)
        out["delta_rig_ci"] = list(self.delta_rig_ci) if self.delta_rig_ci is not None else None
        return out


def from_delta(
    claim_id: str,
    statement: str,
    delta: Mapping[str, Any],
    side: int = 1,
    detail: Mapping[str, Any] | None = None,
) -> Claim:
    """A claim from a paired delta (`models.evaluation.paired_delta` fields: delta_auc, _ci, ...)."""
    ci = (float(delta["delta_auc_ci"][0]), float(delta["delta_auc_ci"][1]))
    rig_ci = delta.get("delta_rig_ci")
    return Claim(
        id=claim_id,
        statement=statement,
        estimate=float(delta["delta_auc"]),
        ci=ci,
        verdict=verdict(ci, side),
        delta_rig=float(delta["delta_rig"]) if delta.get("delta_rig") is not None else None,
        delta_rig_ci=(float(rig_ci[0]), float(rig_ci[1])) if rig_ci is not None else None,
        detail=dict(detail or {}),
    )


def protocol_claims(
    judge: FeatureJudge, e2_chosen: str, teacher: str, students: Iterable[int]
) -> list[Claim]:
    """The paper's three claims, each judged on the features' increments over E0 (`judge`).

    `e2_chosen` is E2's peak-standalone-AUC epoch folder, `teacher` E4's teacher run and
    `students` the distilled depths (a depth counts when both its SuKD and feature-KD features
    were measured).
    """
    peak = f"cascade_finetuned@{e2_chosen}"  # E2 stops at peak standalone valid AUC
    checkpoints = [name for name in judge.increments if name.startswith("cascade_finetuned@")]
    best = max(checkpoints, key=lambda name: judge.valid_gain[name])  # ties: the earliest
    out = [
        from_delta(
            PEAK_AUC_NOT_BEST,
            "E2's checkpoint with the best validation feature gain adds more to E0 than its "
            "peak-standalone-AUC checkpoint",
            judge.paired(best, peak),
            detail={
                "best_feature_checkpoint": best,
                "peak_auc_checkpoint": peak,
                "same_checkpoint": best == peak,
                "valid_delta_auc": {name: judge.valid_gain[name] for name in checkpoints},
            },
        ),
        from_delta(
            JOINT_BEATS_FINETUNED,
            "the joint LM's feature adds more to E0 than the E2 (peak-AUC) feature, both fed the "
            "cascaded way",
            judge.paired(teacher, peak),
            detail={"joint_feature": teacher, "finetuned_feature": peak},
        ),
    ]
    for layers in students:
        sukd, featurekd = f"sukd_L{layers}", f"featurekd_L{layers}"
        if sukd in judge.increments and featurekd in judge.increments:
            out.append(
                from_delta(
                    SUKD_BEATS_FEATUREKD,
                    f"the {layers}-layer SuKD student's feature adds more to E0 than the "
                    f"{layers}-layer feature-KD student's",
                    judge.paired(sukd, featurekd),
                    detail={"layers": layers, "sukd": sukd, "featurekd": featurekd},
                )
            )
    return out
