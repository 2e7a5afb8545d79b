"""Numeric features end to end: a simulated log whose numeric column drives clicks, through
prepare -> ctr-stats -> features apply/materialize -> train --mode baseline (E0), into the model
(its dense input) with a measurable, correctly signed effect, standardised on training rows and
served online per impression."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import yaml

from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.features.names import NUMERIC_VIEW
from nlpctr.models import streaming
from nlpctr.models.data import fit_numeric_stats
from nlpctr.models.runs import TrainedRun
from nlpctr.pipelines import ctr_stats, feature_store_cli, ingest, simulate, train
from nlpctr.pipelines.simulator import clicks
from nlpctr.pipelines.specs import load_spec

pytestmark = pytest.mark.slow

E0 = {"loop": {"epochs": 6, "batch_size": 64, "lr": 0.003}, "evaluation": {"bootstrap_rounds": 20}}
FEATURE = "numeric__numeric_1"


@pytest.fixture(scope="module")
def e0(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("numeric")
    log = root / "sim" / "log.parquet"
    simulate.run(["--rows", "4000", "--rho", "0.5", "--numeric-features", "1", "--out", str(log)])
    data = root / "data"
    manifest = ingest.run(["--dataset", str(log.with_name("log.spec.yaml")), "--out", str(data)])
    ctr_stats.run(["--data", str(data)])
    feature_store_cli.run(["apply", "--data", str(data)])
    feature_store_cli.run(["materialize", "--data", str(data)])
    config = root / "e0.yaml"
    config.write_text(yaml.safe_dump(E0))
    runs = root / "runs"
    argv = ["--mode", "baseline", "--data", str(data), "--run", "e0", "--runs-dir", str(runs)]
    results = train.run([*argv, "--config", str(config), "--no-progress"])
    return {"log": log, "data": data, "runs": runs, "manifest": manifest, "results": results}


def test_the_simulator_writes_the_column_and_its_effect(e0: dict[str, Any]) -> None:
    log = pd.read_parquet(e0["log"])
    truth = pd.read_parquet(e0["log"].with_name("log.truth.parquet"))
    assert (log["numeric_1"] >= 0).all()
    weight = json.loads(e0["log"].with_name("log.truth.json").read_text())["coefficients"]["numeric_weights"]
    assert weight == {"numeric_1": clicks.NUMERIC_WEIGHT_FIRST}
    effect = weight["numeric_1"] * (np.log1p(log["numeric_1"]) - clicks.NUMERIC_LOG_MEAN)
    np.testing.assert_allclose(truth["numeric_effect"], effect, atol=1e-12)
    parts = [*clicks.COMPONENTS, clicks.NUMERIC_EFFECT]
    np.testing.assert_allclose(truth[parts].sum(axis=1), truth["logit"], atol=1e-9)
    spec = load_spec(str(e0["log"].with_name("log.spec.yaml")))
    assert spec.numeric["numeric_1"].log1p


def test_prepare_writes_the_log1p_values_and_the_manifest_names_them(e0: dict[str, Any]) -> None:
    manifest = e0["manifest"]
    assert manifest["numeric_columns"] == ["numeric_1"]
    assert manifest["rows_in"] == manifest["rows_written"] == 4000
    rows = ds.dataset(e0["data"] / "impressions").to_table(columns=["impression_id", "numeric_1"]).to_pandas()
    log = pd.read_parquet(e0["log"], columns=["impression_id", "numeric_1"])
    merged = rows.merge(log, on="impression_id", suffixes=("", "_raw"))
    np.testing.assert_allclose(merged["numeric_1"], np.log1p(merged["numeric_1_raw"]), rtol=1e-12)


def test_e0_reads_the_feature_standardised_on_training_rows(e0: dict[str, Any]) -> None:
    run = TrainedRun.load(e0["runs"] / "e0")
    assert run.spec["service"] == "baseline"
    assert run.pre.columns.numeric == (FEATURE,)
    ids = len(run.pre.columns.ctr) + len(run.pre.columns.counts)
    assert run.pre.shape.dense_dim == ids + 1  # the model's dense input is one wider
    frame = store.training_frame(e0["data"], "baseline")
    train_values = frame.loc[frame.split == "train", FEATURE]
    ((mean, sd),) = run.pre.numeric_stats
    assert mean == pytest.approx(train_values.mean()) and sd == pytest.approx(train_values.std(ddof=0))
    assert mean != pytest.approx(frame[FEATURE].mean(), abs=1e-12)  # train rows only, not all
    data = run.pre.tensorize(frame)
    column = data.dense[:, ids].numpy()
    assert (
        abs(column[data.split == "train"].mean()) < 1e-5
        and abs(column[data.split == "train"].std() - 1) < 1e-4
    )


def test_the_trained_e0_responds_to_the_feature_as_the_truth_says(e0: dict[str, Any]) -> None:
    """The known effect is +0.5 per sd of log1p(numeric_1): moving the feature from -1 sd to
    +1 sd raises the true logit by 1.0. A small E0 trained for seconds finds part of it (about
    0.28), with the right sign on every test row; a model blind to the feature would show 0."""
    run = TrainedRun.load(e0["runs"] / "e0")
    frame = store.training_frame(e0["data"], "baseline", ["test"])
    ((mean, sd),) = run.pre.numeric_stats
    low, high = frame.assign(**{FEATURE: mean - sd}), frame.assign(**{FEATURE: mean + sd})
    _, p_low = run.predict_frame(low)
    _, p_high = run.predict_frame(high)
    lift = np.log(p_high / (1 - p_high)) - np.log(p_low / (1 - p_low))
    assert lift.mean() > 0.15, lift.mean()
    assert (lift > 0).all()


def test_the_baseline_service_serves_the_feature_per_impression(e0: dict[str, Any]) -> None:
    rows = ds.dataset(e0["data"] / "impressions").to_table(columns=["impression_id", "numeric_1"]).to_pylist()
    lookup = store.OnlineFeatures(e0["data"], "baseline")
    assert "impression_id" in lookup.keys
    result = feature_store_cli.run(
        [
            "get",
            "--data",
            str(e0["data"]),
            "--service",
            "baseline",
            "--json",
            "--impression",
            rows[0]["impression_id"],
        ]
    )
    (value,) = result["values"]
    assert value[FEATURE] == pytest.approx(rows[0]["numeric_1"])
    views = {v.name for v in store.open_store(e0["data"]).list_feature_views()}
    assert NUMERIC_VIEW in views


def test_spec_mistakes_in_the_numeric_section_are_one_line(tmp_path: Path) -> None:
    base = {
        "name": "n",
        "source": {"path": "log.csv", "format": "csv"},
        "columns": {"ad_id": "ad", "ad_text": "title"},
        "timestamp": {"column": "ts", "format": "iso8601"},
        "label": {"form": "binary", "clicked": "c"},
        "group": "ad_id",
    }
    cases = {
        "numeric.position": {"position": "p"},  # a schema/context name
        "numeric.Bid": {"Bid": "bid"},
        "numeric.bid.log1p": {"bid": {"column": "bid", "log1p": "yes"}},
        "numeric.bid: unknown key 'scale'": {"bid": {"column": "bid", "scale": 2}},
        "numeric: expected a mapping": ["bid"],
    }
    for expected, numeric in cases.items():
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({**base, "context": {"position": "p"}, "numeric": numeric}))
        with pytest.raises(UserError, match=expected.replace(".", r"\.")) as error:
            load_spec(str(path))
        assert "\n" not in str(error.value)


def test_streamed_scaling_equals_the_in_memory_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            "split": ["train"] * 60 + ["test"] * 20,
            FEATURE: np.where(rng.random(80) < 0.1, np.nan, rng.normal(5, 2, 80)),
            "numeric__constant": 4.0,
        }
    )
    for split, part in frame.groupby("split"):
        (tmp_path / split).mkdir()
        for i, rows in enumerate(np.array_split(part, 2)):
            rows.to_parquet(tmp_path / split / f"part-{i}.parquet")
    columns = [FEATURE, "numeric__constant"]
    expected = fit_numeric_stats(frame, columns)
    streamed = streaming.fit_numeric_stats(tmp_path, columns)
    np.testing.assert_allclose(np.array(streamed), np.array(expected), rtol=1e-12)
    assert expected[1] == (4.0, 1.0)  # a constant column is scaled by 1: it encodes as 0


def test_simulator_refuses_a_numeric_feature_count_out_of_range(tmp_path: Path) -> None:
    argv = ["--rows", "10", "--rho", "0.5", "--out", str(tmp_path / "log.parquet")]
    with pytest.raises(UserError, match="--numeric-features must be between 0 and 8"):
        simulate.run([*argv, "--numeric-features", "9"])
    assert not list(tmp_path.iterdir())
