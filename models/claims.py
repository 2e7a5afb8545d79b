"""The paper's claims, each a paired difference with a CI and a verdict that follows from the CI.

A claim says which side of zero it expects (`side`: +1 for "greater", -1 for "smaller").
"holds" needs the CI to exclude 0 on that side, "contradicted" needs it to exclude 0 on the
other side, and anything else is "not significant": the point estimate never decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

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
    """A claim from a paired delta (`models.experiment.paired_delta` fields: delta_auc, _ci, ...)."""
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
