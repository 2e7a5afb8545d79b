"""The sweep's predictions: the exact trend test and the verdicts on made-up sweeps (no training;
the protocol run end to end is in test_experiment.py)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from nlpctr.models import claims, sweep
from nlpctr.models.report import sweep_sections
from nlpctr.pipelines.experiment import sweep as rho_sweep
from nlpctr.pipelines.experiment.config import load_protocol
from nlpctr.pipelines.experiment.protocol import ExperimentRequest

RHOS = [0.0, 0.25, 0.5, 0.75, 1.0]


def test_the_exact_trend_test_counts_orders() -> None:
    assert sweep.spearman_p(RHOS, [1, 2, 3, 4, 5], +1) == pytest.approx(1 / 120)
    assert sweep.spearman_p(RHOS, [1, 2, 3, 4, 5], -1) == pytest.approx(1.0)
    # one swapped neighbour: Spearman 0.9, reached by the identity and 4 swaps (p 5/120)
    assert sweep.spearman_p(RHOS, [1, 3, 2, 4, 5], +1) == pytest.approx(5 / 120)
    assert sweep.trend_verdict(RHOS, [1, 3, 2, 4, 5], +1)["verdict"] == claims.HOLDS
    assert sweep.trend_verdict(RHOS, [1, 4, 2, 5, 3], +1)["verdict"] == claims.NOT_SIGNIFICANT
    assert sweep.trend_verdict(RHOS, [5, 4, 3, 2, 1], +1)["verdict"] == claims.CONTRADICTED
    assert sweep.trend_verdict(RHOS, [1, 1, 1, 1, 1], +1)["verdict"] == claims.NOT_SIGNIFICANT
    assert sweep.trend_verdict(RHOS, [1, math.nan, 3, 4, 5], +1)["verdict"] == claims.NOT_SIGNIFICANT


def feature(explained: float, gain: float, ci: tuple[float, float]) -> dict[str, Any]:
    return {
        "explained_fraction": explained,
        "explained_fraction_representation": explained,
        "delta_auc": gain,
        "delta_rig": gain,
        "delta_rig_ci": list(ci),
    }


def made_up_sweep(
    joint_minus_e2: list[tuple[float, float]], form: str = "score"
) -> dict[float, dict[str, Any]]:
    """What `sweep.entry` keeps per rho: E2's chosen checkpoint goes by `cascade_finetuned`."""
    per_rho = {}
    for i, rho in enumerate(RHOS):
        gain = 0.01 * (1 - rho)
        per_rho[rho] = {
            "redundancy": {
                f"frozen/{form}": feature(0.1, gain, (gain - 0.002, gain + 0.002)),
                f"cascade_finetuned/{form}": feature(0.2 + rho / 2, gain, (gain - 0.002, gain + 0.002)),
                f"joint_score/{form}": feature(0.1 + rho / 2, gain, (gain - 0.002, gain + 0.002)),
                f"joint_probe/{form}": feature(0.1, gain, (gain - 0.002, gain + 0.002)),
            },
            "e2_chosen": f"step-{i}",
            "claims": [
                {
                    "id": claims.JOINT_BEATS_FINETUNED,
                    "form": form,
                    "estimate": sum(joint_minus_e2[i]) / 2,
                    "ci": list(joint_minus_e2[i]),
                    "verdict": claims.verdict(joint_minus_e2[i]),
                    "delta_rig": sum(joint_minus_e2[i]) / 2,
                    "delta_rig_ci": list(joint_minus_e2[i]),
                    "detail": {
                        "joint_feature": "joint_score",
                        "finetuned_feature": f"cascade_finetuned@step-{i}",
                    },
                }
            ],
            "controls": [
                {
                    "id": claims.LM_STAGE_BEATS_PROBE,
                    "delta_valid_logloss": -0.001,
                    "delta_valid_logloss_ci": [-0.002, -0.0005],
                    "verdict": claims.HOLDS,
                }
            ],
        }
    return per_rho


def test_a_sweep_that_follows_the_redundancy_gets_holds() -> None:
    predictions = {p["id"]: p for p in sweep.predictions(made_up_sweep([(0.001, 0.002)] * 5))}
    assert predictions["explained_fraction_rises"]["verdict"] == claims.HOLDS
    # the click-trained features: E2's chosen checkpoint and the joint run, not the probe control
    assert set(predictions["explained_fraction_rises"]["parts"]) == {"cascade_finetuned", "joint_score"}
    falls = predictions["incremental_gain_falls"]
    assert falls["verdict"] == claims.HOLDS
    assert falls["parts"]["frozen"]["zero_in_ci_at_last_rho"]
    joint = predictions["joint_share_at_least_e2"]
    assert list(joint["parts"]) == ["0.5", "0.75", "1"] and joint["verdict"] == claims.HOLDS
    assert all(p["form"] == "score" for p in predictions.values())
    vector = sweep.predictions(made_up_sweep([(0.001, 0.002)] * 5, "vector"), "vector")
    assert [p["verdict"] for p in vector] == [claims.HOLDS] * 3


def test_one_contradicting_rho_contradicts_the_joint_prediction() -> None:
    cis = [(0.001, 0.002), (0.001, 0.002), (-0.001, 0.002), (-0.003, -0.001), (0.001, 0.002)]
    predictions = {p["id"]: p for p in sweep.predictions(made_up_sweep(cis))}
    joint = predictions["joint_share_at_least_e2"]
    assert [p["verdict"] for p in joint["parts"].values()] == [
        claims.NOT_SIGNIFICANT,
        claims.CONTRADICTED,
        claims.HOLDS,
    ]
    assert joint["verdict"] == claims.CONTRADICTED
    by_rho = sweep.verdicts_by_rho(made_up_sweep(cis))
    assert [v["verdict"] for v in by_rho["joint_feature_beats_finetuned_feature/score"].values()] == [
        claims.verdict(ci) for ci in cis
    ]
    assert list(by_rho[claims.LM_STAGE_BEATS_PROBE]) == ["0", "0.25", "0.5", "0.75", "1"]


def test_the_report_states_each_prediction_with_its_verdict() -> None:
    predictions = sweep.predictions(made_up_sweep([(0.001, 0.002)] * 5))
    text = "\n".join(sweep_sections.predictions_section(predictions))
    for prediction in predictions:
        assert f"**{prediction['id']}**" in text
    assert "p 0.008" in text  # 1/120, the strongest a 5-point trend can be


def test_the_sweep_sets_its_lm_budget_and_quick_cuts_it() -> None:
    def lm_epochs(quick: bool, simulated: bool) -> Any:
        return load_protocol(quick, None, simulated=simulated).train_config["lm_loop"]["epochs"]

    assert lm_epochs(True, True) == lm_epochs(True, False) < lm_epochs(False, True) <= lm_epochs(False, False)


def test_a_kept_rho_names_e2s_chosen_checkpoint_as_its_feature() -> None:
    measured = {"delta_rig": 0.1}
    results = {
        "redundancy": {
            "cascade_finetuned@step-0/score": {},
            "cascade_finetuned@step-8/score": measured,
            "cascade_finetuned@step-8/vector": measured,
            "frozen/score": {},
        },
        "runs": {},
        "e2_curve": {"peak_auc_checkpoint": "step-8"},
        "controls": [{"id": claims.LM_STAGE_BEATS_PROBE}],
    }
    kept = sweep.entry(results)
    assert kept["e2_chosen"] == "step-8" and kept["controls"] == results["controls"]
    assert set(kept["redundancy"]) == {"cascade_finetuned/score", "cascade_finetuned/vector", "frozen/score"}
    assert kept["redundancy"]["cascade_finetuned/score"] is measured


def test_a_rerun_keeps_only_rhos_finished_with_the_same_protocol_and_seed(tmp_path: Path) -> None:
    protocol = load_protocol(True, None, simulated=True)
    (tmp_path / "results.json").write_text(
        json.dumps({"protocol": protocol.to_dict(), "seed": 0, "runs": {}})
    )
    defaults = ExperimentRequest("simulated", tmp_path)
    assert rho_sweep.finished_rho(tmp_path, protocol, defaults) is not None
    for changed_flag in ({"seed": 1}, {"rows": 10}, {"impressions_per_row": 5}):
        flags = dataclasses.replace(defaults, **changed_flag)
        assert rho_sweep.finished_rho(tmp_path, protocol, flags) is None
    changed = dataclasses.replace(
        protocol, simulator=dataclasses.replace(protocol.simulator, text_strength=2.0)
    )
    assert rho_sweep.finished_rho(tmp_path, changed, defaults) is None
    assert rho_sweep.finished_rho(tmp_path / "nothing", protocol, defaults) is None
