"""Verdicts follow from the CI, on the claimed side, never from the point estimate."""

from __future__ import annotations

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
