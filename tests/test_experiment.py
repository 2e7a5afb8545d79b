"""`nlpctr experiment`: the whole protocol on a small simulated log, and the redundancy sweep.

Both use a 1-layer LM and a few hundred training steps; sizes are in the YAML written here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from nlpctr.errors import UserError
from nlpctr.models import claims
from nlpctr.pipelines import simulate
from nlpctr.pipelines.experiment import command
from nlpctr.pipelines.experiment import config as config_module
from nlpctr.pipelines.experiment import sweep as rho_sweep
from nlpctr.pipelines.job_options import JobOptions


class _Any:
    """Equal to any number (a stage's seconds differ between two runs of it)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, float | int)


ANY_S = _Any()

TINY = {
    "embed_layers": 1,
    "lm_layers": 2,
    "fusions": ["score"],
    "train_config": {
        "net": {"hidden": [32, 16]},
        "loop": {"epochs": 4, "patience": 1},
        # E2's and E3's LM stage: 2 epochs of 8 steps, validated (E2: checkpointed) every 4
        "lm_loop": {"epochs": 2, "max_batches_per_epoch": 8, "batch_size": 64, "evals_per_epoch": 2},
        "recipe": {"probe": {"epochs": 3}},
        "encoder": {"max_length": 24},
        "evaluation": {"bootstrap_rounds": 50},
    },
    "distill": {
        "teacher_fusion": "score",
        "students": [1],
        "loop": {"epochs": 1, "max_batches_per_epoch": 10, "batch_size": 64},
        "feature_kd": {"epochs": 1, "max_batches_per_epoch": 10, "batch_size": 64},
        "throughput_texts": 64,
    },
    "redundancy": {"max_rows": 2000},
}
FORMS = ("score", "vector")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory: pytest.TempPathFactory, tiny_config: Path) -> dict:
    root = tmp_path_factory.mktemp("experiment")
    log = root / "log" / "log.parquet"
    simulate.run(["--rows", "3000", "--rho", "0.3", "--out", str(log), "--no-progress"])
    out = root / "out"
    spec = str(log.with_name("log.spec.yaml"))
    command.run(
        ["--dataset", spec, "--quick", "--config", str(tiny_config), "--out", str(out), "--no-progress"]
    )
    return {"out": out, "results": json.loads((out / "results.json").read_text())}


def test_results_follow_the_documented_schema(protocol_run: dict) -> None:
    results = protocol_run["results"]
    assert {"dataset", "seed", "split", "runs", "redundancy", "distillation", "provenance"} <= set(results)
    assert set(results["runs"]) == {
        "baseline",
        "cascade_frozen",
        "cascade_finetuned",
        "joint_score",
        "joint_probe",
    }
    for name, run in results["runs"].items():
        assert 0.0 < run["auc"] < 1.0 and run["auc_ci"][0] <= run["auc"] <= run["auc_ci"][1]
        if name != "baseline":
            assert run["delta_auc_ci"][0] <= run["delta_auc_vs_baseline"] <= run["delta_auc_ci"][1]
    assert set(results["distillation"]) == {"sukd_L1", "nokd_L1", "featurekd_L1"}
    teacher = results["teacher"]
    assert teacher["run"] == "joint_score" and set(teacher["valid_delta_auc"]) == {"joint_score"}
    for name, entry in results["distillation"].items():
        assert entry["rows_per_s"] > 0 and entry["teacher_rows_per_s"] > 0
        for form in FORMS:  # judged as a feature added to E0, in each form, against the teacher's
            student, measured = entry[form], results["redundancy"][f"{name}/{form}"]
            assert student["feature_delta_auc"] == measured["delta_auc"] and student["dim"] == measured["dim"]
            if teacher["nothing_to_distil"][form]:
                assert student["conversion_auc"] is None
                assert student["conversion_note"].startswith("nothing to distil")
            else:
                expected = student["feature_delta_auc"] / teacher[form]["feature_delta_auc"]
                assert student["conversion_auc"] == pytest.approx(expected, rel=1e-6)
                low, high = student["conversion_auc_ci"]
                assert low <= student["conversion_auc"] <= high


def test_claims_are_decided_within_one_form_at_one_width(protocol_run: dict) -> None:
    results = protocol_run["results"]
    ids = {claims.PEAK_AUC_NOT_BEST, claims.JOINT_BEATS_FINETUNED, claims.SUKD_BEATS_FEATUREKD}
    ids.add(claims.SUKD_BEATS_NOKD)
    assert {(c["id"], c["form"]) for c in results["claims"]} == {(i, f) for i in ids for f in FORMS}
    redundancy = results["redundancy"]
    for claim in results["claims"]:
        low, high = claim["ci"]
        assert low <= claim["estimate"] <= high
        assert claim["verdict"] == claims.verdict(claim["ci"])
        detail, form = claim["detail"], claim["form"]
        sides = [detail.get(k) for k in ("joint_feature", "finetuned_feature", "sukd", "other")]
        sides += [detail.get("best_feature_checkpoint"), detail.get("peak_auc_checkpoint")]
        widths = {redundancy[f"{side}/{form}"]["dim"] for side in sides if side}
        assert widths == {detail["dim"]}, claim  # both sides reach E0 at one width
        if form == "score":
            assert detail["dim"] == 1
    joint = next(
        c for c in results["claims"] if c["id"] == claims.JOINT_BEATS_FINETUNED and c["form"] == "score"
    )
    gap = (
        redundancy["joint_score/score"]["delta_auc"]
        - redundancy[f"{joint['detail']['finetuned_feature']}/score"]["delta_auc"]
    )
    assert joint["estimate"] == pytest.approx(gap, abs=1e-9)
    peak = next(c for c in results["claims"] if c["id"] == claims.PEAK_AUC_NOT_BEST)["detail"]
    chosen = next(p["checkpoint"] for p in results["e2_curve"]["points"] if p["chosen"])
    assert peak["peak_auc_checkpoint"] == f"cascade_finetuned@{chosen}"
    report = (protocol_run["out"] / "report.md").read_text()
    assert report.index("## The paper's claims") < report.index("## Runs")


def test_the_lm_stage_is_judged_against_its_probe_only_control(protocol_run: dict) -> None:
    results = protocol_run["results"]
    controls = {(c["id"], c.get("form")): c for c in results["controls"]}
    valid = controls[(claims.LM_STAGE_BEATS_PROBE, None)]
    assert (valid["run"], valid["control"]) == ("joint_score", "joint_probe")
    runs = results["runs"]
    # the control is the joint run's own probe: the same head on the same frozen LM, stopped there
    assert runs["joint_probe"]["stages"][0] == {
        **runs["joint_score"]["stages"][0],
        "wall_seconds": ANY_S,
        "cpu_seconds": ANY_S,
    }
    low, high = valid["delta_valid_logloss_ci"]
    assert low <= valid["delta_valid_logloss"] <= high
    assert valid["verdict"] == claims.verdict(valid["delta_valid_logloss_ci"], side=-1)
    assert valid["delta_valid_logloss"] == pytest.approx(
        valid["run_valid_logloss"] - valid["control_valid_logloss"], abs=1e-9
    )
    for form in FORMS:
        feature = controls[(claims.JOINT_FEATURE_BEATS_PROBE_FEATURE, form)]
        assert feature["verdict"] == claims.verdict(feature["ci"])
    assert "## Controls" in (protocol_run["out"] / "report.md").read_text()


def test_e2_and_e3_share_one_lm_and_one_budget(protocol_run: dict) -> None:
    runs = protocol_run["results"]["runs"]
    e2, e3 = runs["cascade_finetuned"], runs["joint_score"]
    assert e2["encoder"] == e3["encoder"] and e2["encoder"]["layers"] == 2
    for key in ("steps", "rows_seen", "batch_size", "lr", "warmup_steps", "decay"):
        assert e2["budget"]["lm"][key] == e3["budget"]["lm"][key], key
    assert e2["budget"]["lm"]["steps"] == 16 and e2["budget"]["lm"]["rows_seen"] == 16 * 64
    assert e2["budget"]["lm"]["cpu_seconds"] > 0
    assert "### Budgets" in (protocol_run["out"] / "report.md").read_text()


def test_joint_runs_record_their_stages_and_never_lose_to_e0(protocol_run: dict) -> None:
    runs = protocol_run["results"]["runs"]
    joint, e0 = runs["joint_score"], runs["baseline"]["best_valid_logloss"]
    assert [s["name"] for s in joint["stages"]] == ["head", "lm"]
    assert [s["name"] for s in runs["joint_probe"]["stages"]] == ["head"]
    assert joint["stages"][0]["start_valid_logloss"] == e0
    assert joint["best_valid_logloss"] <= joint["stages"][1]["start_valid_logloss"] <= e0
    assert joint["valid_curve"][0] == {**joint["valid_curve"][0], "step": 0, "valid_logloss": e0}
    assert protocol_run["results"]["teacher"]["layers"] == 2
    assert "### Joint training stages" in (protocol_run["out"] / "report.md").read_text()


def test_every_nlp_feature_is_measured_in_both_forms(protocol_run: dict) -> None:
    redundancy = protocol_run["results"]["redundancy"]
    features = {entry["feature"]: entry["kind"] for entry in redundancy.values()}
    assert features["frozen"] == "frozen" and features["joint_probe"] == "probe"
    assert {k for k, v in features.items() if v == "joint"} == {"joint_score"}
    assert sum(v == "cascade_finetuned" for v in features.values()) == 5  # step 0, 4, 8, 12, 16
    assert {"sukd_L1", "nokd_L1", "featurekd_L1"} == {k for k, v in features.items() if v == "student"}
    assert set(redundancy) == {f"{feature}/{form}" for feature in features for form in FORMS}
    for key, entry in redundancy.items():
        assert key == f"{entry['feature']}/{entry['form']}"
        assert entry["dim"] == 1 if entry["form"] == "score" else entry["dim"] > 1
        assert 0.0 <= entry["standalone_auc"] <= 1.0
        assert entry["cka"] == pytest.approx(entry["cka"]) and 0.0 <= entry["cka"] <= 1.0 + 1e-9
        assert entry["explained_fraction"] <= 1.0
    # a score from the LM's own head where it has one, else from a probe on its vectors
    sources = {
        entry["feature"]: entry["score_source"] for entry in redundancy.values() if entry["form"] == "score"
    }
    assert sources["joint_score"] == sources["sukd_L1"] == "head" and sources["frozen"] == "probe"
    assert sources["featurekd_L1"] == "probe"
    curve = protocol_run["results"]["e2_curve"]
    assert sum(point["chosen"] for point in curve["points"]) == 1


def test_ceilings_from_the_simulator_truth_bound_every_model(protocol_run: dict) -> None:
    results = protocol_run["results"]
    ceilings, runs = results["ceilings"], results["runs"]
    oracle, no_text = ceilings["oracle"], ceilings["no_text_oracle"]
    assert ceilings["kind"] == "simulated"
    # The true probability ranks and predicts best: above E0 and above everything but the text.
    assert oracle["auc"] > runs["baseline"]["auc"] and oracle["auc"] > no_text["auc"]
    assert oracle["rig"] > runs["baseline"]["rig"] and oracle["rig"] > no_text["rig"]
    assert ceilings["text_gain"]["auc"]["estimate"] > 0  # its CI: ~30 test clicks at this size
    ratio = ceilings["e0_rig_over_no_text_oracle_rig"]
    assert ceilings["e0_near_no_text_oracle"] == (ratio >= 0.9)
    # No model recovers more than the achievable text gain, up to noise.
    entries = {**{k: v for k, v in runs.items() if k != "baseline"}, **results["redundancy"]}
    for name, entry in entries.items():
        for metric in ("rig", "auc"):
            share = entry["share_of_text_gain"][metric]
            assert share["ci"][0] <= share["estimate"] <= share["ci"][1], (name, metric, share)
            assert share["ci"][0] < 1.0, (name, metric, share)
    assert "## Ceilings" in (protocol_run["out"] / "report.md").read_text()


def test_in_memory_increment_equals_the_feast_trained_run(protocol_run: dict) -> None:
    # E2's chosen checkpoint trained through Feast (`nlpctr train`) and in memory: same model.
    assert protocol_run["results"]["provenance"]["e2_feast_vs_in_memory_max_abs_diff"] < 1e-6


def test_report_and_plots_are_written(protocol_run: dict) -> None:
    out = protocol_run["out"]
    report = (out / "report.md").read_text()
    assert "sukd_L1" in report and "joint_score" in report
    plots = sorted(out.glob("*.png"))
    assert len(plots) >= 5
    for plot in plots:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plot.name in report


def test_students_deeper_than_the_teacher_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"lm_layers": 1, "distill": {"students": [1, 2]}}))
    with pytest.raises(UserError, match="students of 2 layers"):
        config_module.load_protocol(quick=True, config_file=config)


def test_sweep_simulates_aggregated_rows_and_reports_e0_against_its_no_text_oracle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commands: list[simulate.SimulateRequest] = []
    passed: list[JobOptions] = []

    def fake_protocol(args: Any, protocol: dict, dataset: str, out: Path) -> dict:
        passed.append(args.options)  # each rho's protocol runs on the user's infrastructure
        rho = float(out.name.removeprefix("rho-"))
        share = {"rig": {"estimate": 1.0 - rho, "ci": [0.0, 1.0]}, "auc": {"estimate": 0.5, "ci": None}}
        feature = {
            "explained_fraction": rho,
            "explained_fraction_representation": rho,
            "delta_auc": 0.01 - rho,
        }
        feature.update(delta_rig=0.01 * (1 - rho), share_of_text_gain=share)
        ceiling = {
            "kind": "simulated",
            "e0_near_no_text_oracle": rho > 0,
            "e0_rig_over_no_text_oracle_rig": 0.8 + rho,
        }
        control = {"id": claims.LM_STAGE_BEATS_PROBE, "delta_valid_logloss": -rho - args.seed}
        control.update(delta_valid_logloss_ci=[-rho - 1, 1.0], verdict=claims.NOT_SIGNIFICANT)
        return {
            "redundancy": {"frozen/score": feature, "frozen/vector": feature},
            "runs": {},
            "ceilings": ceiling,
            "controls": [control],
        }

    monkeypatch.setattr(simulate, "simulate", commands.append)
    monkeypatch.setattr(rho_sweep, "run_protocol", fake_protocol)
    # One seed (experiment.yaml's sweep runs extra seeds at some rho; they come last, below)
    one_seed = tmp_path / "one_seed.yaml"
    one_seed.write_text(yaml.safe_dump({"simulator": {"seeds": [0]}}))
    argv = ["--dataset", "simulated", "--rho", "0,1", "--rows", "500", "--out", str(tmp_path / "sweep")]
    results = command.run([*argv, "--impressions-per-row", "20", "--config", str(one_seed)])
    assert [c.impressions_per_row for c in commands] == [20, 20]
    assert passed == [JobOptions(), JobOptions()]
    assert results["impressions_per_row"] == 20
    per_rho = results["simulator"]["per_rho"]
    assert [per_rho[r]["e0_near_no_text_oracle"] for r in ("0", "1")] == [False, True]
    assert per_rho["1"]["e0_rig_over_no_text_oracle_rig"] == pytest.approx(1.8)
    assert results["simulator"]["trends"]["frozen/score:share_of_text_gain_rig"]["falls"]
    assert (tmp_path / "sweep" / "simulator_shares.png").is_file()
    assert "seeds" not in results["simulator"]  # one seed unless the protocol names others
    # 0: one binary impression per row, as before the flag existed.
    commands.clear()
    command.run([*argv, "--impressions-per-row", "0", "--out", str(tmp_path / "binary")])
    assert all(c.impressions_per_row is None for c in commands)
    with pytest.raises(UserError, match="--impressions-per-row"):
        command.run(["--dataset", "upworthy", "--out", str(tmp_path / "x"), "--impressions-per-row", "5"])
    # Extra seeds at some rho: their own folders, and the spread of every control over the seeds.
    seeds = tmp_path / "seeds.yaml"
    seeds.write_text(yaml.safe_dump({"simulator": {"seeds": [0, 1, 2], "seed_rho": [1.0]}}))
    out = tmp_path / "seeded"
    results = command.run([*argv, "--out", str(out), "--config", str(seeds)])
    assert results["simulator"]["seeds"] == [0, 1, 2] and set(results["simulator"]["per_seed"]) == {"1", "2"}
    assert (out / "seed-1" / "rho-1").is_dir() and not (out / "seed-1" / "rho-0").exists()
    spread = results["simulator"]["spread"]
    assert list(spread) == ["1"]
    control = spread["1"][claims.LM_STAGE_BEATS_PROBE]
    assert control["values"] == [-1.0, -2.0, -3.0] and control["mean"] == pytest.approx(-2.0)
    assert control["sd"] == pytest.approx(1.0) and control["verdicts"] == [claims.NOT_SIGNIFICANT] * 3
    assert "### Over seeds" in (out / "report.md").read_text()


SWEEP = {
    "fusions": ["score"],
    "distill": {**TINY["distill"], "students": []},
    # Aggregated rows (20 impressions each), as the sweep runs: E0 near its no-text oracle.
    "simulator": {"rows": 1500, "text_strength": 1.5, "distill": False, "impressions_per_row": 20},
    "train_config": {
        **TINY["train_config"],
        # ~1,000 aggregated training rows: E0 needs epochs (4 gave it test AUC 0.39, 40 gave 0.82)
        "loop": {"epochs": 40, "patience": 3, "batch_size": 64},
        "lm_loop": {"epochs": 2, "max_batches_per_epoch": 8, "batch_size": 64, "evals_per_epoch": 2},
    },
}


def test_a_student_exports_with_the_experiments_claims(protocol_run: dict, tmp_path: Path) -> None:
    """`nlpctr export --run sukd_L1`: the student (rebuilt from its student.json and its teacher's run)
    read back with transformers gives its fusion head's logits; the card carries the claims."""
    from nlpctr.models import distill
    from nlpctr.models.lm_features import pairs_of, text_pairs
    from nlpctr.models.runs import StudentMeta, TrainedRun
    from nlpctr.models.text_batches import TextBatcher
    from nlpctr.pipelines import export

    runs, results = protocol_run["out"] / "runs", protocol_run["results"]
    meta = StudentMeta.read(runs / "_students" / "sukd_L1")
    assert (meta.method, meta.layers, meta.teacher) == ("sukd", 1, "joint_score")
    out = tmp_path / "sukd_L1"
    record = export.run(["--run", "sukd_L1", "--runs-dir", str(runs), "--out", str(out)])
    assert record["kind"] == "student" and record["checks"][0]["max_abs_diff"] < 1e-5
    teacher = TrainedRun.load(runs / "joint_score")
    lm = distill.student_encoder(teacher.lm, 1)
    state = torch.load(runs / "_students" / "sukd_L1" / meta.checkpoint, weights_only=True)
    lm.load_state_dict(state["lm"])
    lm.eval()  # (a student is built trainable: no dropout here)
    teacher.model.load_state_dict(state["model"])
    frame = pd.read_parquet(protocol_run["out"] / "data" / "impressions")
    pairs = pairs_of(text_pairs(frame).head(200))
    # The teacher reads a (query, ad) pair apart ([u_q, u_a, u_q * u_a]), and so does its student.
    head = json.loads((out / "click_head.json").read_text())
    assert teacher.spec["text_with_query"] and head["pair_reading"] == "separate"
    assert head["input_dim"] == 3 * lm.dim
    with torch.inference_mode():
        texts = TextBatcher(lm, teacher.spec["text_with_query"])
        want = teacher.model.fusion.score(texts.encode_pairs(pairs)).squeeze(-1).numpy()
    np.testing.assert_allclose(export.FolderScorer(out).outputs(pairs)[1], want, atol=1e-5, rtol=0)
    card = (out / "README.md").read_text()
    for claim in results["claims"]:
        assert f"| `{claim['id']}" in card and claim["verdict"] in card
    student = results["distillation"]["sukd_L1"]
    for form in FORMS:
        entry = student[form]
        assert f"{form} form ({entry['dim']}-d): ΔAUC {entry['feature_delta_auc']:+.4f}" in card
    featurekd = export.run(["--run", "featurekd_L1", "--runs-dir", str(runs), "--out", str(tmp_path / "fkd")])
    assert featurekd["output"] == "vector" and not (tmp_path / "fkd" / "click_head.safetensors").exists()
