"""Training and evaluation in bounded memory: the DuckDB point-in-time join gives Feast's
answers (its file store's and its DuckDB store's, which agree), streamed batches train like
in-memory ones, and streamed metrics equal the in-memory metrics on small data."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from builders import BASE, impressions, make_dataset, write_ctr_history, write_embeddings
from feast import FeatureStore
from test_trainer import COLUMNS, baseline, synthetic_frame

from nlpctr.features import store, store_config
from nlpctr.features.definitions import build_definitions
from nlpctr.features.job_outputs import JobOutputs
from nlpctr.models import metrics, streaming_metrics
from nlpctr.models.config import deep_merge
from nlpctr.models.data import tensorize
from nlpctr.models.evaluation import EvaluationConfig, metric_report, paired_delta
from nlpctr.models.prediction import predict_split
from nlpctr.models.runs import Preprocessing
from nlpctr.models.streaming import ShardSource, fit_vocabularies, needed_columns, unique_text_pairs
from nlpctr.models.trainer import LoopConfig, fit
from nlpctr.pipelines import evaluate, train

# ------------------------------------------------------------------------------- the join


def feature_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if "__" in c]


def assert_same_frames(shards: Path | pd.DataFrame, expected: pd.DataFrame) -> None:
    """Same rows (by impression id) with the same feature values, null where null, row by row;
    `shards`: write_training_shards' folder, or a frame."""
    if isinstance(shards, Path):
        got = pd.concat([pq.read_table(p).to_pandas() for p in sorted(shards.glob("*/*.parquet"))])
    else:
        got = shards
    got = got.sort_values("impression_id").reset_index(drop=True)
    expected = expected.sort_values("impression_id").reset_index(drop=True)
    assert list(got.columns) == list(expected.columns)
    assert got.impression_id.tolist() == expected.impression_id.tolist()
    for column in feature_columns(expected):
        left, right = expected[column].tolist(), got[column].tolist()
        for a, b in zip(left, right, strict=True):
            a_null = a is None or (np.isscalar(a) and pd.isna(a))
            b_null = b is None or (np.isscalar(b) and pd.isna(b))
            assert a_null == b_null, column
            if not a_null:
                np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), rtol=1e-6)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = make_dataset(tmp_path_factory.mktemp("streaming") / "ds", rows=400)
    write_ctr_history(data)
    write_embeddings(data, dim=8)
    store.apply(data)
    return data


def test_duckdb_join_equals_feast_training_frame(prepared: Path) -> None:
    shards = store.write_training_shards(prepared, "cascade_frozen")
    expected = store.training_frame(prepared, "cascade_frozen", offline="file")
    assert expected[feature_columns(expected)].notna().any().all()
    assert_same_frames(shards, expected)
    # Feast's DuckDB store: the same frame, rows in the impressions' order (vectors included).
    duckdb_store = store.training_frame(prepared, "cascade_frozen", offline="duckdb")
    assert duckdb_store.impression_id.tolist() == expected.impression_id.tolist()
    assert_same_frames(duckdb_store, expected)
    test = pq.read_table(shards / "test" / "part-0.parquet").to_pandas()
    assert test.impression_id.is_monotonic_increasing and set(test.split) == {"test"}


def test_a_quote_in_the_data_path_is_data_not_sql(tmp_path: Path) -> None:
    """DuckDB gets paths as string literals: a `'` in a folder name must not end them."""
    data = make_dataset(tmp_path / "it's here" / "ds", rows=120)
    write_ctr_history(data)
    write_embeddings(data, dim=8)
    store.apply(data)
    shards = store.write_training_shards(data, "cascade_frozen")
    assert_same_frames(shards, store.training_frame(data, "cascade_frozen"))
    pairs = unique_text_pairs(shards)
    rows = impressions(data)
    assert len(pairs) == len(rows.drop_duplicates(["query_text_id", "ad_text_id"]))


def test_duckdb_join_keeps_feast_snapshot_and_ttl_semantics(tmp_path: Path) -> None:
    # Three snapshots per key, one of them before every row; then a 30-day ttl: the latest row
    # at or before each time, null once older than ttl; rows at a snapshot's exact time see it.
    data = make_dataset(tmp_path / "snapshots", rows=120)
    write_ctr_history(data)
    path = data / "ctr_history_rows" / "part-0.parquet"
    rows = pd.read_parquet(path)
    times = [BASE - pd.Timedelta(days=1), BASE + pd.Timedelta(days=30), BASE + pd.Timedelta(days=60)]
    pd.concat([rows.assign(event_timestamp=t, position_ctr=float(k)) for k, t in enumerate(times)]).sample(
        frac=1.0, random_state=0
    ).to_parquet(path, index=False)
    store.apply(data)
    frame = store.training_frame(data, "baseline", offline="file")
    assert frame["ctr_position__position_ctr"].nunique() == 3
    assert_same_frames(store.write_training_shards(data, "baseline"), frame)
    assert_same_frames(store.training_frame(data, "baseline", offline="duckdb"), frame)

    fs = FeatureStore(repo_path=str(store_config.repo_dir(data)))
    fs.apply(build_definitions(JobOutputs.discover(data), ttl=timedelta(days=20)).objects())
    frame = store.training_frame(data, "baseline", offline="file")
    assert frame["ctr_position__position_ctr"].isna().any()
    assert_same_frames(store.write_training_shards(data, "baseline"), frame)
    assert_same_frames(store.training_frame(data, "baseline", offline="duckdb"), frame)


# ------------------------------------------------------------------------------- streaming


def write_frame_shards(frame: pd.DataFrame, root: Path, row_group: int) -> None:
    for split, rows in frame.groupby("split"):
        (root / split).mkdir(parents=True)
        rows = rows.sort_values("impression_id")
        rows.to_parquet(root / split / "part-0.parquet", index=False, row_group_size=row_group)


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    frame = synthetic_frame(4000)
    root = tmp_path_factory.mktemp("shards")
    write_frame_shards(frame, root, row_group=300)
    data, vocabularies = tensorize(frame, COLUMNS, group="ad_id")
    return {"frame": frame, "root": root, "data": data, "vocabularies": vocabularies}


def shard_source(frames: dict[str, Any]) -> ShardSource:
    vocabularies = fit_vocabularies(frames["root"], COLUMNS.categorical)
    assert vocabularies == frames["vocabularies"]
    pre = Preprocessing(COLUMNS, vocabularies, 0.5, (), "ad_id")
    return ShardSource(frames["root"], pre.tensorize, needed_columns(COLUMNS, "ad_id"), shuffle_rows=1000)


def test_streamed_batches_are_the_in_memory_tensors(frames: dict[str, Any]) -> None:
    source, data = shard_source(frames), frames["data"]
    ordered = list(source.batches("test", 128))
    rows = data.rows("test")
    assert source.rows_in("test") == len(rows) == sum(len(b.impression_id) for b in ordered)
    assert np.concatenate([b.impression_id for b in ordered]).tolist() == data.impression_id[rows].tolist()
    torch.testing.assert_close(torch.cat([b.dense for b in ordered]), data.dense[rows])
    torch.testing.assert_close(torch.cat([b.categorical for b in ordered]), data.categorical[rows])
    first = [b.impression_id for b in source.batches("train", 64, torch.Generator().manual_seed(1))]
    again = [b.impression_id for b in source.batches("train", 64, torch.Generator().manual_seed(1))]
    other = [b.impression_id for b in source.batches("train", 64, torch.Generator().manual_seed(2))]
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    assert sorted(np.concatenate(first)) == sorted(data.impression_id[data.rows("train")])
    assert not (np.concatenate(first) == np.concatenate(other)).all()


def test_fit_trains_on_a_stream_with_the_same_loop(frames: dict[str, Any], tmp_path: Path) -> None:
    source, data = shard_source(frames), frames["data"]
    config = LoopConfig(epochs=2, batch_size=128, lr=3e-3)
    model = baseline(data)
    result = fit(model, source, config, tmp_path / "stream", progress=False)
    again = baseline(data)
    fit(again, source, config, tmp_path / "again", progress=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
    p, labels = predict_split(model, source, "test", None)
    assert len(result.history) == 2 and metrics.auc(labels, p) > 0.6


# ------------------------------------------------------------------------------- metrics


def test_streamed_metrics_equal_the_in_memory_report() -> None:
    rng = np.random.default_rng(0)
    n = 6000
    groups = np.array([f"q{g}" for g in rng.integers(0, 150, n)], dtype=object)
    shown = rng.integers(1, 4, n)
    p = 1 / (1 + np.exp(-rng.normal(-1.5, 1.0, n)))
    p[:200] = 0.2  # exact ties
    clicks = rng.binomial(shown, np.clip(p * rng.uniform(0.6, 1.4, n), 0, 1))
    labels = metrics.Labels(shown, clicks, groups)
    evaluation = EvaluationConfig(bootstrap_rounds=50, bootstrap_seed=3, calibration_bins=10)
    expected = metric_report(labels, p, 0.15, evaluation)
    streamed = streaming_metrics.StreamingMetrics()
    for start in range(0, n, 700):
        chunk = slice(start, start + 700)
        streamed.add(metrics.Labels(shown[chunk], clicks[chunk], groups[chunk]), p[chunk])
    got = streamed.report(0.15, 50, 3, 10)
    assert got["rows"] == n and got["clicks"] == expected["clicks"]
    for key in ("auc", "gauc", "logloss", "rig"):
        assert got[key] == pytest.approx(expected[key], abs=2e-4), key
    for key in ("auc_ci", "gauc_ci", "rig_ci"):
        np.testing.assert_allclose(got[key], expected[key], atol=2e-4, err_msg=key)
    assert got["calibration"]["ratio"] == pytest.approx(expected["calibration"]["ratio"], rel=1e-9)
    assert got["calibration"]["ece"] == pytest.approx(expected["calibration"]["ece"], abs=2e-3)
    assert shown.sum() == got["impressions"]
    baseline = np.clip(p + rng.normal(0, 0.05, n), 0.01, 0.99)
    paired = paired_delta(labels, p, baseline, 0.15, evaluation)
    delta = streamed.paired_delta(streamed.rescored(baseline), 0.15, 50, 3)
    for key in ("auc", "rig", "gauc"):
        assert delta[key].estimate == pytest.approx(paired[f"delta_{key}"], abs=2e-4), key
        np.testing.assert_allclose(delta[key].as_list(), paired[f"delta_{key}_ci"], atol=2e-4, err_msg=key)


# ------------------------------------------------------------------------------- the CLI

QUICK_EVAL = EvaluationConfig(bootstrap_rounds=20, bootstrap_seed=0, calibration_bins=15)
QUICK = {
    "loop": {"epochs": 2, "max_batches_per_epoch": 3, "batch_size": 64},
    "encoder": {"max_length": 16},
    "evaluation": {"bootstrap_rounds": 20},
    "modes": {"joint": {"loop": {"epochs": 1, "batch_size": 16}}},
}


@pytest.mark.slow
def test_train_and_evaluate_stream(prepared: Path, tmp_path: Path) -> None:
    manifest = json.loads((prepared / "manifest.json").read_text())
    manifest.update(spec={"columns": {"query_id": "query_id"}}, split={"mode": "random", "seed": 0})
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump(QUICK))
    runs = tmp_path / "runs"
    rows = impressions(prepared)
    test = rows[rows.split == "test"].sort_values("impression_id")
    labels = metrics.Labels(test.impressions.to_numpy(), test.clicks.to_numpy(), test.query_id.to_numpy())
    p = {}
    for name, flags in (("e0", ["--mode", "baseline"]), ("e3", ["--mode", "joint", "--fusion", "concat"])):
        argv = [
            *flags,
            "--data",
            str(prepared),
            "--run",
            name,
            "--runs-dir",
            str(runs),
            "--config",
            str(config),
        ]
        layers = ["--layers", "1"] if name == "e3" else []
        results = train.run([*argv, *layers, "--streaming", "--no-progress"])
        spec = json.loads((runs / name / "run.json").read_text())
        assert spec["streaming"] is True
        saved = pd.read_parquet(runs / name / "predictions.parquet")  # test and validation rows
        assert sorted(saved.split.unique()) == ["test", "valid"]
        predictions = saved.query("split == 'test'")
        assert predictions.impression_id.tolist() == test.impression_id.tolist()
        p[name] = predictions.p.to_numpy()
        in_memory = metric_report(labels, p[name], spec["train_ctr"], QUICK_EVAL)
        for key in ("auc", "gauc", "logloss", "rig"):
            assert results["metrics"]["test"][key] == pytest.approx(in_memory[key], abs=2e-4), key
    out = evaluate.run(["--run", "e3", "--baseline", "e0", "--runs-dir", str(runs)])
    assert out["evaluate"]["max_abs_diff_vs_train_predictions"] <= 1e-6
    assert out["metrics"]["test"]["auc"] == pytest.approx(results["metrics"]["test"]["auc"], abs=1e-9)
    expected = paired_delta(labels, p["e3"], p["e0"], spec["train_ctr"], QUICK_EVAL)
    for key in ("delta_auc", "delta_rig", "delta_gauc"):
        assert out["delta_vs_baseline"][key] == pytest.approx(expected[key], abs=2e-4), key


# ------------------------------------------------------------------------------- E2 streamed

E2_QUICK = {
    "loop": {"epochs": 2, "max_batches_per_epoch": 3, "batch_size": 64},
    "lm_loop": {"epochs": 2, "max_batches_per_epoch": 3, "batch_size": 16},
    "recipe": {"probe": {"epochs": 0}},  # the LM stage alone: 7 checkpoints (every step, from 0)
    "encoder": {"max_length": 16},
    "evaluation": {"bootstrap_rounds": 20},
}
# Learning rates 0: every fit keeps its seeded initial weights, whatever order it reads rows in.
FIXED_WEIGHTS = {"loop": {"lr": 0.0, "lm_lr": 0.0}, "lm_loop": {"lr": 0.0, "lm_lr": 0.0}}


@pytest.fixture(scope="module")
def e2_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = make_dataset(tmp_path_factory.mktemp("e2") / "ds", rows=300)
    manifest = json.loads((data / "manifest.json").read_text())
    columns = {"query_id": "query_id", "query_text": "query_text"}
    manifest.update(spec={"columns": columns}, split={"mode": "random", "seed": 0})
    (data / "manifest.json").write_text(json.dumps(manifest))
    write_ctr_history(data)
    store.apply(data)
    store.materialize(data)  # the online lookups of the published view read E0's views too
    return data


def train_e2(data: Path, runs: Path, name: str, config: dict[str, Any], memory: str) -> dict[str, Any]:
    path = runs.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = ["--mode", "cascade-finetuned", "--layers", "1", "--data", str(data), "--run", name]
    return train.run([*argv, "--runs-dir", str(runs), "--config", str(path), memory, "--no-progress"])


def lm_tables(results: dict[str, Any]) -> dict[str, pd.DataFrame]:
    return {
        name: pd.read_parquet(c["features"]).sort_values(["query_text_id", "ad_text_id"], ignore_index=True)
        for name, c in results["lm"]["checkpoints"].items()
    }


def test_every_mode_streams(e2_data: Path, tmp_path: Path) -> None:
    for mode in train.MODES:
        setup = train.set_up(train.TrainRequest(mode, e2_data, f"r-{mode}", tmp_path, streaming=True))
        assert setup.streamed, mode


@pytest.mark.slow
def test_streamed_e2_equals_in_memory_e2_when_row_order_cannot_matter(e2_data: Path, tmp_path: Path) -> None:
    """Streamed and in-memory E2 read the same rows and write the same features, published alike.

    Trained weights cannot be compared: a streamed fit draws its rows in another order (row groups
    shuffled, then blocks permuted) than an in-memory one (one permutation of the split), by design.
    With learning rates 0 every fit keeps its seeded initial weights, so the order cannot matter and
    everything else must agree: E0's rows the LM reads, its validation and test passes, its score
    and pooled vector per text pair for each epoch, the `cascade_finetuned_<run>` rows with those
    two as inputs, and the test predictions. Metrics agree to 2e-4, not exactly: the streamed ones
    come from score histograms (ties within 3e-5 in logit), the in-memory ones from sklearn.
    """
    runs = tmp_path / "runs"
    runs.mkdir()
    config = deep_merge(E2_QUICK, FIXED_WEIGHTS)
    memory = train_e2(e2_data, runs, "e2m", config, "--in-memory")
    streamed = train_e2(e2_data, runs, "e2s", config, "--streaming")
    assert json.loads((runs / "e2s" / "run.json").read_text())["streaming"] is True
    assert json.loads((runs / "e2m" / "run.json").read_text())["streaming"] is False

    lm_m, lm_s = memory["lm"], streamed["lm"]
    assert (lm_m["feature_view"], lm_s["feature_view"]) == ("lm_e2m", "lm_e2s")
    assert len(lm_s["checkpoints"]) == len(lm_m["checkpoints"]) == 7 and lm_s["chosen"] == lm_m["chosen"]
    for a, b in zip(lm_m["history"], lm_s["history"], strict=True):
        assert b["valid_logloss"] == pytest.approx(a["valid_logloss"], abs=1e-6)
        assert b["valid_auc"] == pytest.approx(a["valid_auc"], abs=1e-6)
    assert lm_s["test_auc_standalone"] == pytest.approx(lm_m["test_auc_standalone"], abs=2e-4)
    tables_m, tables_s = lm_tables(memory), lm_tables(streamed)
    assert list(tables_s) == list(tables_m) == [f"step-{k}" for k in range(7)]
    rows = impressions(e2_data)
    for epoch, table in tables_s.items():
        assert len(table) == len(rows[["query_text_id", "ad_text_id"]].drop_duplicates())
        other = tables_m[epoch]
        for column in ("query_text_id", "ad_text_id", "event_timestamp"):
            assert table[column].tolist() == other[column].tolist(), column
        np.testing.assert_allclose(table.lm_score, other.lm_score, atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.stack(table.lm_embedding), np.stack(other.lm_embedding), atol=1e-6)

    spec = json.loads((runs / "e2s" / "run.json").read_text())
    assert spec["service"] == "cascade_finetuned_e2s"
    assert spec["preprocessing"]["columns"]["cascade"] == []  # its score form alone (cascade_form)
    assert spec["preprocessing"]["columns"]["scores"] == ["lm_e2s__lm_score"]
    p_m, p_s = (
        pd.read_parquet(runs / r / "predictions.parquet").query("split == 'test'").set_index("impression_id")
        for r in ("e2m", "e2s")
    )
    p_m, p_s = p_m.p, p_s.p
    assert p_s.index.tolist() == sorted(rows[rows.split == "test"].impression_id)
    assert float(np.max(np.abs(p_s.to_numpy() - p_m.reindex(p_s.index).to_numpy()))) <= 1e-6
    for key in ("auc", "gauc", "logloss", "rig"):
        got, expected = streamed["metrics"]["test"][key], memory["metrics"]["test"][key]
        assert got == pytest.approx(expected, abs=2e-4), key


@pytest.mark.slow
def test_streamed_e2_fine_tunes_publishes_and_evaluates(e2_data: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    results = train_e2(e2_data, runs, "e2t", E2_QUICK, "--streaming")
    run_dir = runs / "e2t"
    assert {"results.json", "run.json", "predictions.parquet"} <= {p.name for p in run_dir.iterdir()}
    lm = results["lm"]
    aucs = {name: c["valid_auc"] for name, c in lm["checkpoints"].items()}
    assert lm["feature_view"] == "lm_e2t" and lm["chosen"] == max(aucs, key=aucs.get)
    tables = lm_tables(results)
    assert not np.allclose(tables["step-0"].lm_score, tables["step-6"].lm_score)  # the LM learns
    chosen = tables[lm["chosen"]].set_index(["query_text_id", "ad_text_id"])
    row = impressions(e2_data).iloc[0]
    online = store.OnlineFeatures(e2_data, "cascade_finetuned_e2t").get([row.to_dict()])
    key = (row.query_text_id or "", row.ad_text_id)
    assert online.columns["lm_e2t__lm_score"][0] == pytest.approx(chosen.loc[key, "lm_score"], rel=1e-6)

    spec = json.loads((run_dir / "run.json").read_text())
    rows = impressions(e2_data)
    test = rows[rows.split == "test"].sort_values("impression_id")
    predictions = pd.read_parquet(run_dir / "predictions.parquet").query("split == 'test'")
    assert predictions.impression_id.tolist() == test.impression_id.tolist()
    labels = metrics.Labels(test.impressions.to_numpy(), test.clicks.to_numpy(), test.query_id.to_numpy())
    in_memory = metric_report(labels, predictions.p.to_numpy(), spec["train_ctr"], QUICK_EVAL)
    for key in ("auc", "gauc", "logloss", "rig"):
        assert results["metrics"]["test"][key] == pytest.approx(in_memory[key], abs=2e-4), key
    out = evaluate.run(["--run", "e2t", "--runs-dir", str(runs)])
    assert out["evaluate"]["max_abs_diff_vs_train_predictions"] <= 1e-6
