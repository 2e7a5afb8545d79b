"""Verdicts follow from the CI, on the claimed side, never from the point estimate."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nlpctr.models import claims


@pytest.mark.parametrize(
    ("ci", "side", "expected"),
    [
        ((0.001, 0.004), 1, claims.HOLDS),
        ((-0.004, -0.001), 1, claims.CONTRADICTED),
        ((-0.001, 0.004), 1, claims.NOT_SIGNIFICANT),
        ((0.0, 0.004), 1, claims.NOT_SIGNIFICANT),  # touching zero does not exclude it
        ((-0.004, -0.001), -1, claims.HOLDS),
        ((0.001, 0.004), -1, claims.CONTRADICTED),
        ((0.0, 0.0), 1, claims.NOT_SIGNIFICANT),
    ],
)
def test_verdict_follows_the_ci(ci: tuple[float, float], side: int, expected: str) -> None:
    assert claims.verdict(ci, side) == expected


def test_a_positive_estimate_with_a_ci_across_zero_is_not_significant() -> None:
    delta = {
        "delta_auc": 0.01,
        "delta_auc_ci": [-0.001, 0.02],
        "delta_rig": 0.002,
        "delta_rig_ci": [0.0, 0.004],
    }
    claim = claims.from_delta(claims.JOINT_BEATS_FINETUNED, "joint > E2", delta)
    assert claim.verdict == claims.NOT_SIGNIFICANT
    record = claim.to_dict()
    assert record["id"] == claims.JOINT_BEATS_FINETUNED and record["ci"] == [-0.001, 0.02]
    assert record["delta_rig_ci"] == [0.0, 0.004]


def test_side_must_be_a_sign() -> None:
    with pytest.raises(ValueError):
        claims.verdict((0.1, 0.2), 0)


class FakeJudge:
    """What `protocol_claims` reads of a FeatureJudge: increments, validation gains, widths and
    the paired test delta of two features (here: the difference of made-up gains)."""

    def __init__(self, gains: dict[str, float], valid: dict[str, float], dims: dict[str, int]) -> None:
        self.gains, self.valid_gain, self.dims = gains, valid, dims
        self.increments = dict.fromkeys(gains)

    def paired(self, a: str, b: str) -> dict:
        d = self.gains[a] - self.gains[b]
        return {
            "delta_auc": d,
            "delta_auc_ci": [d - 0.001, d + 0.001],
            "delta_rig": d,
            "delta_rig_ci": [d, d],
        }


def judge_of(dims: dict[str, int] | None = None) -> FakeJudge:
    names = {
        "cascade_finetuned@step-0": (0.004, 0.003),
        "cascade_finetuned@step-10": (0.002, 0.004),  # the best on validation
        "cascade_finetuned@step-20": (0.001, 0.001),  # the peak-AUC checkpoint
        "joint_score": (0.006, 0.005),
        "sukd_L1": (0.003, 0.002),
        "featurekd_L1": (0.001, 0.001),
        "nokd_L1": (0.0035, 0.002),
    }
    gains, valid, widths = {}, {}, {}
    for name, (test, valid_gain) in names.items():
        for form, width in (("score", 1), ("vector", 384)):
            key = f"{name}/{form}"
            gains[key], valid[key], widths[key] = test, valid_gain, width
    widths.update(dims or {})
    return FakeJudge(gains, valid, widths)


def test_protocol_claims_choose_on_validation_and_decide_each_form() -> None:
    found = claims.protocol_claims(judge_of(), "step-20", "joint_score", [1])  # type: ignore[arg-type]
    by = {(c.id, c.form): c for c in found}
    assert set(by) == {
        (i, f)
        for i in (
            claims.PEAK_AUC_NOT_BEST,
            claims.JOINT_BEATS_FINETUNED,
            claims.SUKD_BEATS_FEATUREKD,
            claims.SUKD_BEATS_NOKD,
        )
        for f in ("score", "vector")
    }
    peak = by[(claims.PEAK_AUC_NOT_BEST, "score")]
    # the best checkpoint is the validation one (step-10), not the test one (step-0)
    assert peak.detail["best_feature_checkpoint"] == "cascade_finetuned@step-10"
    assert peak.estimate == pytest.approx(0.001) and peak.verdict == claims.NOT_SIGNIFICANT
    joint = by[(claims.JOINT_BEATS_FINETUNED, "vector")]
    assert (
        joint.estimate == pytest.approx(0.005)
        and joint.verdict == claims.HOLDS
        and joint.detail["dim"] == 384
    )
    assert by[(claims.SUKD_BEATS_NOKD, "score")].verdict == claims.NOT_SIGNIFICANT  # -0.0005 ± 0.001
    assert by[(claims.SUKD_BEATS_FEATUREKD, "score")].verdict == claims.HOLDS


def test_protocol_claims_refuse_features_of_unequal_width() -> None:
    unequal = judge_of({"featurekd_L1/vector": 768})
    with pytest.raises(ValueError, match="sukd_L1/vector is 384-d, featurekd_L1/vector 768-d"):
        claims.protocol_claims(unequal, "step-20", "joint_score", [1])  # type: ignore[arg-type]


def test_the_teacher_is_chosen_on_validation() -> None:
    from nlpctr.pipelines.experiment.config import Protocol, load_protocol
    from nlpctr.pipelines.experiment.students import teacher_run

    full = load_protocol(False, None)

    def protocol(teacher_fusion: str) -> Protocol:
        distill = replace(full.distill, teacher_fusion=teacher_fusion)
        return replace(full, fusions=("score", "concat", "gate"), distill=distill)

    gains = {"joint_score/score": 0.001, "joint_concat/score": 0.003, "joint_gate/score": 0.002}
    assert teacher_run(protocol("best"), gains) == "joint_concat"
    assert teacher_run(protocol("gate"), gains) == "joint_gate"
    tied = {**gains, "joint_score/score": 0.003}
    assert teacher_run(protocol("best"), tied) == "joint_score"  # ties: the first


def test_nothing_to_distil_where_the_teacher_feature_gains_nothing_significant() -> None:
    """The conversion rate divides by the teacher feature's gain: none is given in a form where
    that gain's CI includes 0, and the entry says why."""
    from nlpctr.models.increments import FeatureJudge
    from nlpctr.pipelines.experiment.students import student_forms

    class Judge:
        feature_entry = staticmethod(FeatureJudge.feature_entry)

        def __init__(self) -> None:
            self.asked: list[tuple[str, str]] = []

        def conversion(self, student: str, teacher: str) -> dict:
            self.asked.append((student, teacher))
            return {"conversion_auc": 0.5, "conversion_auc_ci": [0.2, 0.8]}

    measured = {
        "dim": 1,
        "delta_auc": 0.001,
        "delta_auc_ci": [0.0, 0.002],
        "delta_rig": 0.0,
        "delta_rig_ci": [0, 0],
    }
    measures = {"sukd_L1/score": measured, "sukd_L1/vector": {**measured, "dim": 384}}
    judge = Judge()
    forms = student_forms(judge, measures, "sukd_L1", "joint_score", {"score": False, "vector": True})  # type: ignore[arg-type]
    assert forms["score"]["conversion_auc"] is None
    assert forms["score"]["conversion_note"].startswith("nothing to distil")
    assert forms["vector"]["conversion_auc"] == 0.5 and forms["vector"]["dim"] == 384
    assert judge.asked == [("sukd_L1/vector", "joint_score/vector")]  # never divided by a null gain
