"""`nlpctr train` / `evaluate` / `score-batch --run` end to end on TREC 2013 (tiny budgets).

One module fixture prepares TREC with the real ingest job, CTR history and random frozen vectors
(the embedding job has its own tests), then trains E0, E1, E2 (1-layer LM) and E3 (gate) with a
few batches per epoch; the tests read what those runs wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import yaml
from builders import SLUG, impressions, write_ctr_history, write_embeddings

from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.layout import lm_cache_dir
from nlpctr.models import metrics
from nlpctr.models.config import load_config
from nlpctr.models.encoder import TextEncoder
from nlpctr.models.evaluation import EvaluationConfig, metric_report, paired_delta
from nlpctr.models.runs import TrainedRun
from nlpctr.models.state_cache import clear_state_caches
from nlpctr.models.trainer import LoopConfig
from nlpctr.pipelines import evaluate, ingest, score_batch, train

pytestmark = pytest.mark.slow

QUICK = {
    "loop": {"epochs": 2, "max_batches_per_epoch": 4},
    "lm_loop": {"epochs": 2, "max_batches_per_epoch": 3, "batch_size": 16},  # E2's and E3's LM stage
    "recipe": {"probe": {"epochs": 2}},
    "encoder": {"max_length": 16},
    "evaluation": {"bootstrap_rounds": 30},
}
RESULT_KEYS = {
    "dataset", "seed", "split", "mode", "fusion", "layers", "epochs", "best_epoch", "history",
    "wall_seconds", "train_rows_per_s", "metrics", "provenance",
}  # fmt: skip
TEST_KEYS = {"auc", "auc_ci", "gauc", "logloss", "rig", "rig_ci", "calibration"}
MODES = {
    "e0": ["--mode", "baseline"],
    "e1": ["--mode", "cascade-frozen"],
    "e2": ["--mode", "cascade-finetuned", "--layers", "1"],
    "e3": ["--mode", "joint", "--fusion", "gate", "--layers", "1"],
    "e3w": ["--mode", "joint", "--fusion", "score", "--layers", "2", "--init-from", "e0"],  # the E3 recipe
}
# e3w (from E0: the probe, the LM stage) also runs stage 2, where E0's tower trains too
OWN_CONFIG = {"e3w": {"recipe": {"probe": {"epochs": 2}, "stage2": {"epochs": 1}}}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train")
    data = root / "trec"
    ingest.run(["--dataset", "trec2013", "--out", str(data)])
    write_ctr_history(data)
    write_embeddings(data, dim=8)
    store.apply(data)
    store.materialize(data)
    config = root / "quick.yaml"
    config.write_text(yaml.safe_dump(QUICK))
    runs = root / "runs"
    results = {}
    for name, flags in MODES.items():
        own = config
        if name in OWN_CONFIG:
            own = root / f"{name}.yaml"
            own.write_text(yaml.safe_dump({**QUICK, **OWN_CONFIG[name]}))
        argv = [*flags, "--data", str(data), "--run", name, "--runs-dir", str(runs), "--config", str(own)]
        results[name] = train.run([*argv, "--no-progress"])
    return {"data": data, "runs": runs, "config": config, "results": results}


@pytest.mark.parametrize("name", list(MODES))
def test_each_mode_writes_results_and_test_predictions(trained: dict[str, Any], name: str) -> None:
    run_dir = trained["runs"] / name
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results) >= RESULT_KEYS
    test = results["metrics"]["test"]
    assert set(test) >= TEST_KEYS
    for metric in ("auc", "rig"):
        low, high = test[f"{metric}_ci"]
        assert low <= test[metric] <= high
    assert 0.3 < test["auc"] < 1 and test["logloss"] > 0
    assert {"ratio", "ece", "curve"} <= set(test["calibration"])
    assert results["provenance"]["dataset"] == "trec2013"
    assert results["provenance"]["split_seed"] == 0
    assert len(results["history"]) == results["evaluations"]
    if not results["stages"]:
        assert len(results["history"]) == results["epochs"]
    predictions = pd.read_parquet(run_dir / "predictions.parquet")
    rows = impressions(trained["data"])
    for split in ("test", "valid"):  # validation too: controls are compared on validation
        saved = predictions[predictions.split == split]
        assert sorted(saved.impression_id) == sorted(rows[rows.split == split].impression_id)
    assert predictions.p.between(0, 1).all()
    assert trained["results"][name]["summary"].startswith(f"train {name} ")


def test_modes_read_their_services_and_encoders(trained: dict[str, Any]) -> None:
    prov = {n: r["provenance"] for n, r in trained["results"].items()}
    assert prov["e0"]["feature_service"] == "baseline" and prov["e0"]["encoder_version"] is None
    assert prov["e1"]["feature_service"] == "cascade_frozen"
    assert (
        prov["e1"]["encoder_version"]
        == json.loads((trained["data"] / "embeddings" / SLUG / "_manifest.json").read_text())[
            "encoder_version"
        ]
    )
    assert prov["e2"]["feature_service"] == "cascade_finetuned_e2"
    assert "layers=1" in prov["e3"]["encoder_version"]
    spec = json.loads((trained["runs"] / "e1" / "run.json").read_text())
    assert spec["preprocessing"]["columns"]["cascade"] == [
        f"ad_text_{SLUG}__embedding",
        f"query_text_{SLUG}__embedding",
    ]
    assert spec["preprocessing"]["vocabularies"]["position"]  # saved with the run


def test_a_warm_started_joint_run_starts_at_e0_and_keeps_its_best(trained: dict[str, Any]) -> None:
    e0, e3w = trained["results"]["e0"], trained["results"]["e3w"]
    history = e3w["history"]
    assert history[0]["step"] == 0 and history[0]["valid_logloss"] == e0["best_valid_logloss"]
    assert [s["name"] for s in e3w["stages"]] == ["head", "lm", "all"]
    assert e3w["stages"][0]["start_valid_logloss"] == e0["best_valid_logloss"]
    assert e3w["stages"][1]["start_valid_logloss"] == e3w["stages"][0]["best_valid_logloss"]
    assert e3w["best_valid_logloss"] == e3w["stages"][-1]["best_valid_logloss"] <= e0["best_valid_logloss"]
    assert e3w["best_valid_logloss"] == min(h["valid_logloss"] for h in history)
    spec = json.loads((trained["runs"] / "e3w" / "run.json").read_text())
    assert spec["checkpoint"] == "checkpoints/ctr/stage2/best.pt"
    assert "valid logloss head " in e3w["summary"] and " lm " in e3w["summary"]
    # the query and the ad read apart: the fusion reads [u_q, u_a, u_q * u_a]
    assert spec["text_with_query"] and "/pairs=separate" in e3w["provenance"]["encoder_version"]
    fusion = TrainedRun.load(trained["runs"] / "e3w").model.fusion
    assert fusion is not None and fusion.score[0].in_features == 3 * 384


@pytest.mark.parametrize("name", ["e1", "e2", "e3", "e3w"])
def test_evaluate_reproduces_train_predictions_and_adds_the_delta(trained: dict[str, Any], name: str) -> None:
    runs = trained["runs"]
    out = evaluate.run(["--run", name, "--baseline", "e0", "--runs-dir", str(runs)])
    results = json.loads((runs / name / "results.json").read_text())
    # an LM layer in bf16 autocast rounds by its batch's padded length, which evaluate's batches
    # need not share with train's: a few 1e-6 there, none in float32
    bf16 = (results.get("encoder") or {}).get("autocast") is not None
    assert out["evaluate"]["max_abs_diff_vs_train_predictions"] <= (1e-5 if bf16 else 1e-6)
    delta = results["delta_vs_baseline"]
    e0 = json.loads((runs / "e0" / "results.json").read_text())["metrics"]["test"]
    assert delta["delta_auc"] == pytest.approx(results["metrics"]["test"]["auc"] - e0["auc"], abs=1e-9)
    for metric in ("auc", "rig", "gauc"):
        low, high = delta[f"delta_{metric}_ci"]
        assert low <= high
        assert delta[f"delta_{metric}_significant"] == (low > 0 or high < 0)


def test_e2_writes_every_checkpoint_and_serves_the_peak_auc_one(trained: dict[str, Any]) -> None:
    data = trained["data"]
    lm = trained["results"]["e2"]["lm"]
    rows = impressions(data)
    pairs = rows[["query_text_id", "ad_text_id"]].fillna("").drop_duplicates()
    # 2 epochs of 3 steps, validated every quarter epoch (every step here), from step 0 (the probe)
    assert list(lm["checkpoints"]) == [f"step-{k}" for k in range(7)]
    tables = {
        k: ds.dataset(Path(c["features"]), format="parquet").to_table().to_pandas()
        for k, c in lm["checkpoints"].items()
    }
    for table in tables.values():
        assert len(table) == len(pairs)
        assert len(table.lm_embedding.iloc[0]) == 3 * 384  # the query and the ad read apart
    # each checkpoint gives its own scores
    assert not np.allclose(tables["step-0"].lm_score, tables["step-6"].lm_score)
    aucs = {k: c["valid_auc"] for k, c in lm["checkpoints"].items()}
    assert lm["chosen"] == max(aucs, key=aucs.get)
    assert lm["valid_auc_rising_at_end"] == (aucs["step-6"] > aucs["step-5"])
    budget = trained["results"]["e2"]["budget"]
    assert budget["lm"]["steps"] == 6 and budget["lm"]["rows_seen"] == 6 * 16 and budget["head"]["steps"] > 0
    chosen = tables[lm["chosen"]].set_index(["query_text_id", "ad_text_id"])
    row = rows.iloc[0]
    online = store.OnlineFeatures(data, "cascade_finetuned_e2").get([row.to_dict()])
    key = (row.query_text_id or "", row.ad_text_id)
    assert online.columns["lm_e2__lm_score"][0] == pytest.approx(chosen.loc[key, "lm_score"], rel=1e-6)
    frame = store.training_frame(data, "cascade_finetuned_e2", ["test"]).head(20)
    for q, a, score in zip(frame.query_text_id, frame.ad_text_id, frame["lm_e2__lm_score"], strict=True):
        assert score == pytest.approx(chosen.loc[(q or "", a), "lm_score"], rel=1e-6)


def test_joint_run_writes_its_supplementary_feature_view(trained: dict[str, Any]) -> None:
    data = trained["data"]
    assert trained["results"]["e3"]["supplementary_feature_view"] == "lm_e3"
    online = store.OnlineFeatures(data, "joint_e3")
    assert "lm_e3__supplementary" in online.feature_names
    assert "lm_e3__lm_embedding" in online.feature_names  # the vector form too
    got = online.get(impressions(data).head(3).to_dict("records"))
    assert got.null_counts["lm_e3__supplementary"] == 0
    assert len(got.columns["lm_e3__supplementary"][0]) == QUICK.get("net", {}).get("text_projection", 32)


def test_batch_scoring_equals_the_trainers_predictions(trained: dict[str, Any]) -> None:
    data, runs = trained["data"], trained["runs"]
    for name in ("e1", "e3"):  # cascade vectors from the online store; the joint LM reads texts
        out = data / f"scored_{name}"
        argv = ["--data", str(data), "--run", name, "--runs-dir", str(runs), "--splits", "test"]
        result = score_batch.run([*argv, "--out", str(out), "--direct_num_workers", "1"])
        scored = ds.dataset(out, format="parquet").to_table().to_pandas().set_index("impression_id")
        saved = pd.read_parquet(runs / name / "predictions.parquet").set_index("impression_id")
        saved = saved[saved["split"] == "test"]  # predictions.parquet holds validation's too
        assert result["rows"] == len(saved)
        encoder = json.loads((runs / name / "results.json").read_text()).get("encoder") or {}
        atol = 1e-5 if encoder.get("autocast") else 1e-6  # bf16 rounds by batch (see above)
        np.testing.assert_allclose(scored.p.reindex(saved.index), saved.p, atol=atol, rtol=0)


def test_training_is_deterministic_and_a_changed_config_is_refused(trained: dict[str, Any]) -> None:
    data, runs, config = trained["data"], trained["runs"], trained["config"]
    argv = ["--mode", "baseline", "--data", str(data), "--runs-dir", str(runs), "--config", str(config)]
    train.run([*argv, "--run", "e0_again", "--no-progress"])
    a = pd.read_parquet(runs / "e0" / "predictions.parquet")
    b = pd.read_parquet(runs / "e0_again" / "predictions.parquet")
    np.testing.assert_array_equal(a.p, b.p)
    with pytest.raises(UserError, match="another configuration"):
        train.run([*argv, "--run", "e0", "--seed", "7", "--no-progress"])


def test_a_rerun_reads_the_frozen_prefix_states_and_predicts_the_same(
    trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, runs = trained["data"], trained["runs"]
    folders = sorted(p.name for p in lm_cache_dir(data).iterdir())
    assert any("-frozen1-" in name for name in folders)  # e3w: 2 layers, the top one trains
    clear_state_caches()  # a fresh process: only the data folder remembers
    computed: list[int] = []
    real = TextEncoder._compute_frozen
    monkeypatch.setattr(
        TextEncoder, "_compute_frozen", lambda self, keys: computed.append(len(keys)) or real(self, keys)
    )
    own = runs.parent / "e3w.yaml"
    argv = [*MODES["e3w"], "--data", str(data), "--runs-dir", str(runs), "--config", str(own)]
    train.run([*argv, "--run", "e3w_again", "--no-progress"])
    assert computed == []  # every state the run needed was read back
    a = pd.read_parquet(runs / "e3w" / "predictions.parquet")
    b = pd.read_parquet(runs / "e3w_again" / "predictions.parquet")
    np.testing.assert_array_equal(a.p, b.p)


def test_config_layers_merge_in_order(tmp_path: Path) -> None:
    override = tmp_path / "c.yaml"
    override.write_text(yaml.safe_dump({"loop": {"epochs": 5}, "modes": {"joint": {"loop": {"lr": 0.5}}}}))
    joint = load_config("joint", override, {"encoder": {"layers": 1}})
    assert joint.loop.epochs == 5  # the user's file beats the defaults
    assert joint.loop.lr == 0.5 and joint.loop.batch_size == 256  # its per-mode section too
    assert joint.encoder.layers == 1
    assert load_config("baseline", override).loop.lr == 0.001
    override.write_text(yaml.safe_dump({"loop": {"epochz": 5}}))
    with pytest.raises(UserError, match="epochz"):
        load_config("baseline", override)


def test_counted_bootstrap_equals_resampling_rows() -> None:
    """metric_report and paired_delta reweight groups; the slow reference concatenates rows."""
    rng = np.random.default_rng(1)
    n = 400
    groups = rng.integers(0, 40, n).astype(str)
    impressions_ = rng.integers(1, 5, n)
    clicks = rng.binomial(impressions_, 0.3)
    labels = metrics.Labels(impressions_, clicks, groups)
    p, q = np.round(rng.random(n), 1).clip(0.05, 0.95), rng.random(n)  # p has ties
    evaluation = EvaluationConfig(bootstrap_rounds=25, bootstrap_seed=3, calibration_bins=5)
    report = metric_report(labels, p, 0.3, evaluation)
    delta = paired_delta(labels, p, q, 0.3, evaluation)

    def rig(lab: metrics.Labels, x: np.ndarray) -> float:
        return metrics.rig(lab, x, 0.3)

    for name, metric in (("auc", metrics.auc), ("rig", rig), ("gauc", metrics.gauc)):
        slow = metrics.bootstrap_ci(metric, labels, p, rounds=25, seed=3)
        assert report[name] == pytest.approx(slow.estimate, abs=1e-12)
        assert report[f"{name}_ci"] == pytest.approx(slow.as_list(), abs=1e-9)
        slow_diff = metrics.paired_bootstrap_diff(metric, labels, p, q, rounds=25, seed=3)
        assert delta[f"delta_{name}"] == pytest.approx(slow_diff.estimate, abs=1e-12)
        assert delta[f"delta_{name}_ci"] == pytest.approx(slow_diff.as_list(), abs=1e-9)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "epochs must be an integer >= 1, got 0"),
        (["--epochs", "-2"], "epochs must be an integer >= 1, got -2"),
    ],
)
def test_meaningless_training_flags_are_one_line_and_make_no_run_folder(
    trained: dict[str, Any], flags: list[str], message: str
) -> None:
    runs = trained["runs"]
    argv = ["--mode", "baseline", "--data", str(trained["data"]), "--runs-dir", str(runs), "--run", "bad"]
    with pytest.raises(UserError, match=f"^{message}$"):
        train.run([*argv, *flags, "--no-progress"])
    assert not (runs / "bad").exists()


def test_a_runs_dir_that_is_a_file_is_one_line(trained: dict[str, Any], tmp_path: Path) -> None:
    not_a_folder = tmp_path / "runs.txt"
    not_a_folder.write_text("mine\n")
    argv = ["--mode", "baseline", "--data", str(trained["data"]), "--runs-dir", str(not_a_folder)]
    with pytest.raises(UserError, match="is not a folder"):
        train.run([*argv, "--run", "r", "--no-progress"])
    assert not_a_folder.read_text() == "mine\n"


def test_a_loop_config_refuses_values_that_cannot_train() -> None:
    LoopConfig()  # the defaults are valid
    for bad in ({"batch_size": 0}, {"lr": -1.0}, {"lr": float("nan")}, {"early_stop": "loss"},
                {"max_batches_per_epoch": 0}, {"eval_every_steps": -1}, {"patience": True}):  # fmt: skip
        with pytest.raises(UserError):
            LoopConfig(**bad)
