"""Ceilings: the simulator's oracles, the split-half ceiling of real logs, shares of the text gain,
and aggregated simulated logs (`--impressions-per-row`) through the real ingest job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from nlpctr.errors import UserError
from nlpctr.models import ceilings, metrics, split_half
from nlpctr.pipelines import cli, ingest, simulate


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# ------------------------------------------------------------------------------- resampling


@pytest.fixture(scope="module")
def aggregated() -> tuple[metrics.Labels, np.ndarray]:
    rng = np.random.default_rng(3)
    n = 400
    impressions = rng.integers(1, 30, size=n)
    p = rng.uniform(0.02, 0.3, size=n)
    clicks = rng.binomial(impressions, p)
    predictions = np.round(np.clip(p + rng.normal(0, 0.05, n), 0.001, 0.999), 2)  # with ties
    return metrics.Labels(impressions, clicks, rng.integers(0, 30, n).astype(str)), predictions


def test_bootstrap_counts_are_the_draws_of_the_index_bootstrap(aggregated: Any) -> None:
    labels, _ = aggregated
    unique, counts = metrics.group_bootstrap_counts(labels.groups, rounds=5, seed=7)
    indices = metrics.group_bootstrap_indices(labels.groups, rounds=5, seed=7)
    code = np.searchsorted(unique, labels.groups)
    for r, idx in enumerate(indices):
        np.testing.assert_array_equal(
            np.bincount(code[idx], minlength=len(unique)), counts[r] * np.bincount(code)
        )


def test_resampled_metrics_equal_the_metrics_on_resampled_rows(aggregated: Any) -> None:
    labels, p = aggregated
    draws = metrics.Draws.of(labels.groups, rounds=4, seed=1)
    result = metrics.resample(labels, p, draws)
    assert result.auc == pytest.approx(metrics.auc(labels, p), abs=1e-12)
    assert result.logloss == pytest.approx(metrics.logloss(labels, p), abs=1e-12)
    assert result.gauc == pytest.approx(metrics.gauc(labels, p), abs=1e-12)
    for r, idx in enumerate(metrics.group_bootstrap_indices(labels.groups, 4, 1)):
        sub = labels.subset(idx)
        assert result.auc_draws[r] == pytest.approx(metrics.auc(sub, p[idx]), abs=1e-12)
        assert result.logloss_draws[r] == pytest.approx(metrics.logloss(sub, p[idx]), abs=1e-12)
        assert result.gauc_draws[r] == pytest.approx(metrics.gauc(sub, p[idx]), abs=1e-12)


# ------------------------------------------------------------------------------- oracle shares


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    """Rows whose true logit is a non-text part plus a text part; a model that knows half the text."""
    rng = np.random.default_rng(0)
    n = 4000
    base, text = rng.normal(-2.0, 0.7, n), rng.normal(0.0, 0.8, n)
    impressions = rng.integers(5, 40, n)
    clicks = rng.binomial(impressions, sigmoid(base + text))
    labels = metrics.Labels(impressions, clicks, rng.integers(0, 80, n).astype(str))
    return {
        "labels": labels,
        "oracle": sigmoid(base + text),
        "no_text": sigmoid(base),
        "half": sigmoid(base + 0.5 * text),
        "train_ctr": clicks.sum() / impressions.sum(),
    }


def test_shares_of_the_text_gain_are_zero_at_e0_and_one_at_the_oracle(world: dict[str, Any]) -> None:
    w = world
    ceiling = ceilings.OracleCeiling(
        w["labels"], w["oracle"], w["no_text"], w["no_text"], w["train_ctr"], 60, 0
    )
    summary = ceiling.summary()
    assert summary["oracle"]["auc"] > summary["no_text_oracle"]["auc"]
    assert summary["oracle"]["rig"] > summary["no_text_oracle"]["rig"] > 0
    assert summary["text_gain"]["auc"]["ci"][0] > 0 and summary["text_gain"]["rig"]["ci"][0] > 0
    assert summary["e0_near_no_text_oracle"] and summary["e0_rig_over_no_text_oracle_rig"] == pytest.approx(1)
    for metric in ("rig", "auc"):
        top = ceiling.share(w["oracle"])[metric]
        assert top["estimate"] == pytest.approx(1.0) and top["ci"] == pytest.approx([1.0, 1.0])
        assert ceiling.share(w["no_text"])[metric]["estimate"] == pytest.approx(0.0, abs=1e-12)
        half = ceiling.share(w["half"])[metric]
        assert 0.2 < half["estimate"] < 0.95 and half["ci"][0] <= half["estimate"] <= half["ci"][1]
        # Pointing the wrong way costs: a model that inverts the text effect has a negative share.
        assert (
            ceiling.share(sigmoid(np.log(w["no_text"] / (1 - w["no_text"])) - 0.5))[metric]["estimate"] < 0.5
        )


def test_a_model_cannot_beat_the_oracle_beyond_noise(world: dict[str, Any]) -> None:
    w = world
    rng = np.random.default_rng(1)
    ceiling = ceilings.OracleCeiling(
        w["labels"], w["oracle"], w["no_text"], w["no_text"], w["train_ctr"], 60, 0
    )
    logit = np.log(w["oracle"] / (1 - w["oracle"]))
    for scale in (0.1, 0.3):  # the oracle plus noise: at most the oracle's share
        share = ceiling.share(sigmoid(logit + rng.normal(0, scale, len(logit))))
        for metric in ("rig", "auc"):
            assert share[metric]["estimate"] <= 1.0 and share[metric]["ci"][0] <= 1.0


# ------------------------------------------------------------------------------- split half


def items_frame(spread: float, seed: int = 0, groups: int = 60, per_group: int = 6) -> pd.DataFrame:
    """Aggregated rows: groups of items whose true CTRs differ by `spread` in logit within a group."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(groups), per_group).astype(str)
    logit = rng.normal(-3.0, 0.5, groups)[np.repeat(np.arange(groups), per_group)]
    logit = logit + rng.normal(0, spread, len(group))
    impressions = rng.integers(3000, 6000, len(group))
    clicks = rng.binomial(impressions, sigmoid(logit))
    return pd.DataFrame(
        {
            "impression_id": [f"i{i:05d}" for i in range(len(group))],
            "test_id": group,
            "impressions": impressions,
            "clicks": clicks,
            "true_ctr": sigmoid(logit),
        }
    )


def test_split_half_ceiling_finds_the_item_ctr_structure() -> None:
    frame = items_frame(spread=0.4)
    result = split_half.split_half_ceiling(frame, "test_id", seed=0)
    labels = metrics.Labels(
        frame["impressions"].to_numpy(), frame["clicks"].to_numpy(), frame["test_id"].to_numpy()
    )
    oracle_gauc = metrics.gauc(labels, frame["true_ctr"].to_numpy())
    assert result["applicable"] and result["splittable_impression_share"] == 1.0
    assert result["gauc"] > 0.55 and result["auc"] > 0.6
    assert abs(result["gauc"] - oracle_gauc) < 0.02  # thousands of impressions an item: near the truth
    assert abs(result["random"]["gauc"] - 0.5) < 0.01 and abs(result["random"]["auc"] - 0.5) < 0.03
    assert result["seed"] == 0
    # Reproducible from the seed; another seed is another split.
    assert split_half.split_half_ceiling(frame, "test_id", seed=0) == result
    assert split_half.split_half_ceiling(frame, "test_id", seed=1)["gauc"] != result["gauc"]


def test_split_half_ceiling_is_near_half_without_structure() -> None:
    # Every item of a group has the same CTR: nothing to rank. The half that scores never sees
    # the half it is judged on, so the ceiling stays at ~0.5 where in-sample scoring overfits.
    frame = items_frame(spread=0.0, seed=2, groups=200)
    result = split_half.split_half_ceiling(frame, "test_id", seed=0)
    assert abs(result["gauc"] - 0.5) < 0.01
    assert result["in_sample"]["gauc"] > result["gauc"] + 0.005


def test_split_half_of_binary_rows_splits_keys_and_says_when_it_does_not_apply() -> None:
    rng = np.random.default_rng(0)
    rows = 3000
    keyed = pd.DataFrame(
        {
            "impression_id": [f"r{i}" for i in range(rows)],
            "query_id": rng.integers(0, 30, rows).astype(str),
            "ad_id": rng.integers(0, 5, rows).astype(str),
            "impressions": np.ones(rows, np.int64),
        }
    )
    ctr = sigmoid(-2 + rng.normal(0, 1.0, 150))
    keyed["clicks"] = rng.binomial(1, ctr[keyed["query_id"].astype(int) * 5 + keyed["ad_id"].astype(int)])
    repeated = split_half.split_half_ceiling(keyed, "query_id", ["query_id", "ad_id"], seed=0)
    assert repeated["applicable"] and repeated["items"] == 150 and repeated["gauc"] > 0.6
    unique = keyed.assign(ad_id=keyed["impression_id"])  # every key shown once
    single = split_half.split_half_ceiling(unique, "query_id", ["query_id", "ad_id"], seed=0)
    assert not single["applicable"] and single["splittable_impression_share"] == 0.0
    labels = metrics.Labels(
        unique["impressions"].to_numpy(), unique["clicks"].to_numpy(), unique["query_id"].to_numpy()
    )
    ceiling = split_half.SplitHalfCeiling(
        unique, labels, np.full(rows, 0.1), "query_id", ["query_id", "ad_id"], rounds=20
    )
    share = ceiling.share(np.full(rows, 0.2))
    assert share["gauc"]["estimate"] is None and "shown more than once" in share["gauc"]["reason"]


def test_split_half_share_of_the_gap_above_e0() -> None:
    frame = items_frame(spread=0.4, seed=4)
    labels = metrics.Labels(
        frame["impressions"].to_numpy(), frame["clicks"].to_numpy(), frame["test_id"].to_numpy()
    )
    e0 = np.full(
        len(frame), frame["clicks"].sum() / frame["impressions"].sum()
    )  # knows nothing within a group
    ceiling = split_half.SplitHalfCeiling(frame, labels, e0, "test_id", rounds=40)
    summary = ceiling.summary()
    assert summary["meaningful"]["gauc"] is True and summary["e0_gap"]["gauc"]["ci"][0] > 0
    truth = ceiling.share(frame["true_ctr"].to_numpy())["gauc"]
    assert truth["estimate"] > 0.9  # the true CTRs recover (at least) the split-half gap
    assert ceiling.share(e0)["gauc"]["estimate"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------- aggregated simulated logs


@pytest.fixture(scope="module")
def aggregated_log(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("agg")
    out = root / "log.parquet"
    argv = ["--rows", "3000", "--rho", "0.5", "--impressions-per-row", "40", "--out", str(out)]
    result = simulate.run([*argv, "--chunk-rows", "1000", "--no-progress"])
    prepared = root / "prepared"
    manifest = ingest.run(["--dataset", result["paths"]["spec"], "--out", str(prepared)])
    return {"root": root, "out": out, "result": result, "prepared": prepared, "manifest": manifest}


def test_impressions_per_row_round_trips_through_ingest_as_aggregated_labels(aggregated_log: dict) -> None:
    result, manifest = aggregated_log["result"], aggregated_log["manifest"]
    spec = yaml.safe_load(Path(result["paths"]["spec"]).read_text())
    assert spec["label"] == {"form": "aggregated", "impressions": "impressions", "clicks": "clicks"}
    log = pq.read_table(aggregated_log["out"]).to_pandas()
    assert "clicked" not in log and (log["impressions"] == 40).all()
    assert (log["clicks"] >= 0).all() and (log["clicks"] <= 40).all()
    assert manifest["label_form"] == "aggregated"
    assert manifest["rows_written"] == 3000 and manifest["rows_rejected"] == 0
    prepared = pq.read_table(aggregated_log["prepared"] / "impressions").to_pandas()
    assert int(prepared["impressions"].sum()) == 3000 * 40 == result["realised"]["impressions"]
    assert int(prepared["clicks"].sum()) == int(log["clicks"].sum()) == result["realised"]["clicks"]
    split = manifest["split"]
    assert (
        sum(split["impressions"].values()) == 120_000
        and sum(split["clicks"].values()) == result["realised"]["clicks"]
    )
    # Clicks are Binomial(40, p) with the truth's p: the realised CTR is the mean probability.
    truth = pq.read_table(result["paths"]["truth"]).to_pandas()
    mean_p = truth["click_prob"].mean()
    assert abs(result["realised"]["ctr"] - mean_p) < 4 * np.sqrt(mean_p * (1 - mean_p) / 120_000)
    saved = json.loads(Path(result["paths"]["truth_json"]).read_text())
    assert saved["impressions_per_row"] == 40 and "Binomial(40" in saved["model"]["click"]


def test_impressions_per_row_is_deterministic_by_seed(aggregated_log: dict, tmp_path: Path) -> None:
    first = aggregated_log["result"]["paths"]
    argv = [
        "--rows",
        "3000",
        "--rho",
        "0.5",
        "--impressions-per-row",
        "40",
        "--chunk-rows",
        "1000",
        "--no-progress",
    ]
    again = simulate.run([*argv, "--out", str(tmp_path / "a" / "log.parquet")])
    for key in ("log", "truth", "truth_json", "spec"):
        assert Path(again["paths"][key]).read_bytes() == Path(first[key]).read_bytes(), key
    other = simulate.run([*argv, "--seed", "1", "--out", str(tmp_path / "b" / "log.parquet")])
    assert Path(other["paths"]["log"]).read_bytes() != Path(first["log"]).read_bytes()
    with pytest.raises(UserError, match="--impressions-per-row"):
        simulate.run([*argv, "--impressions-per-row", "0", "--out", str(tmp_path / "c" / "log.parquet")])


def test_ceilings_cli_reads_the_truth_of_a_simulated_log(aggregated_log: dict, capsys: Any) -> None:
    prepared = aggregated_log["prepared"]
    assert cli.main(["ceilings", "--data", str(prepared), "--bootstrap-rounds", "20"]) == 0
    line = capsys.readouterr().out
    assert "oracle AUC" in line and "split-half AUC" in line
    out = ceilings.run(["--data", str(prepared), "--bootstrap-rounds", "20"])
    oracle, no_text, half = out["oracle"], out["no_text_oracle"], out["split_half"]
    assert oracle["auc"] > no_text["auc"] and oracle["rig"] > no_text["rig"]
    assert oracle["gauc"] > no_text["gauc"]
    # Knowing each row's CTR from half of its 40 impressions is noisier than knowing the truth.
    assert 0.5 < half["auc"] < oracle["auc"]
    assert cli.main(["ceilings", "--data", str(aggregated_log["root"])]) == 2
