"""Batch enrichment: Beam's stock per-element Enrichment (FeastFeatureStoreEnrichmentHandler) and
the batched Arrow lookups agree with each other, with an online lookup and with the training
frame's vectors."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
import yaml
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from builders import SLUG, impressions, make_dataset, write_ctr_history, write_embeddings
from test_damaged_files import QUICK, one_line, train_args

from nlpctr.errors import UserError
from nlpctr.features import store, store_config
from nlpctr.layout import read_manifest
from nlpctr.models.device import CPU, Placement
from nlpctr.models.schema import impression_schema
from nlpctr.pipelines import cli, score_batch, score_transforms


def _missing(value: Any) -> bool:
    """Null as parquet -> pandas gives it: None for lists, NaN for numbers."""
    return value is None or (isinstance(value, float) and np.isnan(value))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = make_dataset(tmp_path_factory.mktemp("score") / "ds", rows=150, seed=3)
    write_ctr_history(data)
    vectors = write_embeddings(data, seed=3)
    store.apply(data)
    store.materialize(data)
    outputs = {}
    for mode in score_batch.ENRICHMENT_MODES:
        out = data / f"enriched_{mode}"
        result = score_batch.run(
            [
                *("--data", str(data), "--enrichment", mode, "--batch-size", "16", "--out", str(out)),
                *("--splits", "valid", "test", "--direct_num_workers", "1"),
            ]
        )
        table = ds.dataset(out, format="parquet").to_table()
        outputs[mode] = (result, table)
    return {"data": data, "vectors": vectors, "outputs": outputs}


def test_both_enrichment_modes_write_the_same_rows(served: dict[str, Any]) -> None:
    rows = impressions(served["data"])
    expected_ids = sorted(rows[rows.split.isin(["valid", "test"])].impression_id)
    frames = {}
    for mode, (result, table) in served["outputs"].items():
        frame = table.to_pandas().sort_values("impression_id").reset_index(drop=True)
        assert frame.impression_id.tolist() == expected_ids
        assert result["rows"] == len(expected_ids)
        assert table.schema.field(f"ad_text_{SLUG}__embedding").type == pa.list_(pa.float32())
        frames[mode] = frame
    batched, single = frames["batched"], frames["per-element"]
    assert list(batched.columns) == list(single.columns)
    for column in batched.columns:
        left, right = batched[column].to_list(), single[column].to_list()
        assert all(
            (_missing(a) and _missing(b)) or np.array_equal(a, b) for a, b in zip(left, right, strict=True)
        ), column


def test_enriched_rows_equal_online_lookups_and_training_vectors(served: dict[str, Any]) -> None:
    data, vectors = served["data"], served["vectors"]
    _, table = served["outputs"]["batched"]
    frame = table.to_pandas()
    online = store.OnlineFeatures(data, "cascade_frozen")
    assert [c for c in frame.columns if "__" in c] == online.feature_names
    looked_up = online.get(frame.to_dict("records"))
    for name in online.feature_names:
        got = [None if _missing(v) else np.asarray(v, dtype=float) for v in frame[name]]
        want = [None if v is None else np.asarray(v, dtype=float) for v in looked_up.columns[name]]
        assert all(
            (a is None) == (b is None) and (a is None or np.allclose(a, b, atol=1e-6))
            for a, b in zip(got, want, strict=True)
        ), name
    for tid, vector in zip(frame.ad_text_id, frame[f"ad_text_{SLUG}__embedding"], strict=True):
        np.testing.assert_allclose(vector, vectors[tid], atol=1e-5)
    # Serving and training name and fill the text features alike.
    training = store.training_frame(data, splits=["valid", "test"]).set_index("impression_id")
    for column in (f"ad_text_{SLUG}__embedding", f"query_text_{SLUG}__embedding"):
        for iid, vector in zip(frame.impression_id, frame[column], strict=True):
            np.testing.assert_allclose(vector, training.loc[iid, column], atol=1e-5)


def test_null_features_are_counted(served: dict[str, Any]) -> None:
    for result, table in served["outputs"].values():
        frame = table.to_pandas()
        counted = {n: int(frame[n].isna().sum()) for n in result["null_counts"]}
        assert result["null_counts"] == counted
        # Ads first shown in valid/test have no CTR history: null, counted, not a crash.
        assert counted["ctr_ad_id__ad_id_ctr"] > 0
        assert result["rows_with_nulls"] == int(frame[list(counted)].isna().any(axis=1).sum())


def test_a_store_not_materialised_fails_before_the_pipeline(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "fresh", rows=40)
    write_ctr_history(data)
    with pytest.raises(UserError, match="nlpctr features apply"):
        score_batch.run(["--data", str(data), "--service", "baseline"])
    store.apply(data)
    with pytest.raises(UserError, match="nlpctr features materialize"):
        score_batch.run(["--data", str(data), "--service", "baseline"])
    assert not (data / "enriched").exists() or not any((data / "enriched").iterdir())


def test_entity_row_sends_null_keys_as_an_unknown_id() -> None:
    row = beam.Row(ad_id="a1", query_text_id=None, position=3)
    assert score_transforms.EntityRow(["ad_id", "query_text_id", "position"])(row) == {
        "ad_id": "a1",
        "query_text_id": store.MISSING_KEY,
        "position": "3",
    }
    joined = score_transforms.KeepFeatures(["f__x"])({"ad_id": "a1"}, {"ad_id": "other", "f__x": 1.5, "g": 2})
    assert joined._asdict() == {"ad_id": "a1", "f__x": 1.5}


# ------------------------------------------------------------------- the composite transforms


def test_enrich_from_online_store_adds_the_looked_up_features(served: dict[str, Any]) -> None:
    """Rows in -> the same rows plus exactly the features an online lookup returns for them."""
    data = served["data"]
    online = store.OnlineFeatures(data, "cascade_frozen")
    rows = impressions(data).head(20).to_dict("records")
    rows.append({**rows[0], "impression_id": "unknown-ad", "ad_id": "no-such-ad"})
    looked_up = online.get(rows)
    source = {row["impression_id"]: row for row in rows}
    expected = {
        row["impression_id"]: {name: looked_up.columns[name][i] for name in online.feature_names}
        for i, row in enumerate(rows)
    }
    assert any(v is None for v in expected["unknown-ad"].values())  # an unknown key comes back null

    def same_features(enriched: list[dict[str, Any]]) -> None:
        assert sorted(r["impression_id"] for r in enriched) == sorted(expected)  # each row once
        for row in enriched:
            want = expected[row["impression_id"]]
            assert {k: row[k] for k in rows[0]} == source[row["impression_id"]]  # the row, unchanged
            for name, value in want.items():
                assert (value is None and row[name] is None) or np.allclose(row[name], value), name

    lookup = store.OnlineFeatureLookup(store_config.config_path(data), "cascade_frozen")
    handler = score_transforms.per_element_handler(
        store_config.config_path(data), "cascade_frozen", online.keys
    )
    source_schema = impression_schema(read_manifest(data).get("context_columns", []))
    schema = pa.schema([*source_schema, *store.service_fields(online.service)])
    table = pa.Table.from_pylist(rows, schema=source_schema)
    with BeamTestPipeline() as pipeline:
        batched = (
            pipeline
            | "Batches" >> beam.Create([table.slice(0, 7), table.slice(7)])
            | "Batched" >> beam.ParDo(score_transforms.EnrichBatches(lookup, batch_size=4))
            | "BatchedRows" >> beam.FlatMap(lambda t: t.to_pylist())
        )
        assert_that(batched, same_features, label="batched")
        single = (
            pipeline
            | "Rows" >> beam.Create(rows)
            | "PerElement" >> score_transforms.EnrichFromOnlineStore(handler, schema, online.feature_names)
            | "PerElementRows" >> beam.FlatMap(lambda t: t.to_pylist())
        )
        assert_that(single, same_features, label="per-element")


def test_online_feature_lookup_looks_each_distinct_key_up_once(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = served["data"]
    online = store.OnlineFeatures(data, "cascade_frozen")
    rows = impressions(data).head(6).to_dict("records")
    batch = pa.Table.from_pylist([*rows, *rows, rows[0]])  # 13 rows, 6 distinct
    lookup = store.OnlineFeatureLookup(store_config.config_path(data), "cascade_frozen")
    lookup.open()
    assert lookup.store is not None
    sent: list[int] = []
    real = lookup.store.get_online_features

    def counting(**kwargs: Any) -> Any:
        sent.append(len(next(iter(kwargs["entity_rows"].values()))))
        return real(**kwargs)

    monkeypatch.setattr(lookup.store, "get_online_features", counting)
    enriched = lookup(batch)
    # One read per view (the ad and query text share the embedding view), of its distinct keys.
    views = {p.name for p in online.service.feature_view_projections}
    assert len(lookup.reads) == len(views) < len(online.service.feature_view_projections)

    def key(value: Any) -> str:
        return store.MISSING_KEY if value is None else str(value)

    assert sent == [
        len({tuple(key(r[c]) for c in columns) for _, columns, _ in read.projections for r in rows})
        for read in lookup.reads
    ]
    assert sum(sent) < 13 * len(lookup.reads)
    assert enriched.num_rows == 13
    assert enriched.column_names == [*batch.column_names, *online.feature_names]
    want = online.get(enriched.to_pylist())
    for name in online.feature_names:
        for got, expected in zip(enriched[name].to_pylist(), want.columns[name], strict=True):
            assert (got is None and expected is None) or np.allclose(got, expected), name


def test_online_feature_lookup_splits_a_batchs_keys_into_bounded_calls(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most `call_keys` keys a Feast call, and the batch comes back as one call would give it."""
    data = served["data"]
    batch = pa.Table.from_pylist(impressions(data).head(40).to_dict("records"))
    whole = store.OnlineFeatureLookup(store_config.config_path(data), "cascade_frozen")
    chunked = store.OnlineFeatureLookup(store_config.config_path(data), "cascade_frozen", call_keys=3)
    chunked.open()
    assert chunked.store is not None
    sent: list[int] = []
    real = chunked.store.get_online_features

    def counting(**kwargs: Any) -> Any:
        sent.append(len(next(iter(kwargs["entity_rows"].values()))))
        return real(**kwargs)

    monkeypatch.setattr(chunked.store, "get_online_features", counting)
    assert chunked(batch).equals(whole(batch))
    assert max(sent) == 3 and len(sent) > len(chunked.reads)


class _FakeRun:
    """A trained run that scores a row by its position and returns the rows reversed (the job
    must join scores back by impression id, not by order)."""

    @classmethod
    def load(cls, directory: Path, placement: Placement) -> _FakeRun:
        assert placement == CPU  # the worker's device: `auto` on a machine without CUDA
        return cls()

    def predict_frame(self, frame: Any) -> tuple[Any, np.ndarray]:
        reversed_frame = frame.iloc[::-1].reset_index(drop=True)
        return reversed_frame, reversed_frame["position"].to_numpy(dtype=float) / 10


def test_score_with_run_adds_each_rows_own_probability(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(score_transforms, "TrainedRun", _FakeRun)
    rows = [{"impression_id": f"i{n}", "position": n % 7, "ad_id": f"a{n % 3}"} for n in range(150)]
    table = pa.Table.from_pylist(rows)
    with BeamTestPipeline() as pipeline:
        scored = (
            pipeline
            | beam.Create([table.slice(0, 100), table.slice(100)])
            | score_transforms.ScoreWithRun(tmp_path / "run")
            | beam.FlatMap(lambda t: t.to_pylist())
        )
        assert_that(scored, equal_to([{**row, "p": row["position"] / 10} for row in rows]))


def test_read_impression_rows_keeps_only_the_wanted_splits(served: dict[str, Any]) -> None:
    frame = impressions(served["data"])
    pattern = str(served["data"] / "impressions" / "*.parquet")
    wanted = frame[frame.split.isin(["valid", "test"])].impression_id.tolist()
    assert 0 < len(wanted) < len(frame)
    with BeamTestPipeline() as pipeline:
        ids = (
            pipeline
            | score_transforms.ReadImpressionRows(pattern, ["valid", "test"])
            | beam.Map(lambda r: r["impression_id"])
        )
        assert_that(ids, equal_to(wanted))


def test_run_uses_the_test_pipeline_it_is_given(served: dict[str, Any], tmp_path: Path) -> None:

    class CountingPipeline(BeamTestPipeline):
        runs = 0

        def run(self, *args: Any, **kwargs: Any) -> Any:
            CountingPipeline.runs += 1
            return super().run(*args, **kwargs)

    data, out = served["data"], tmp_path / "enriched"
    result = score_batch.run(
        ["--data", str(data), "--splits", "test", "--out", str(out)], test_pipeline=CountingPipeline()
    )
    assert CountingPipeline.runs == 1
    frame = ds.dataset(out, format="parquet").to_table().to_pandas()
    assert result["rows"] == len(frame) == int((impressions(data).split == "test").sum())


def test_arrow_batches_travel_with_their_own_coder(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job's batches are typed `pa.Table` and coded by `ArrowTableCoder`: a round trip keeps
    the table, and Beam weighs a batch by its byte count instead of pickling it."""
    table = pa.table(
        {"id": ["a", None], "vector": pa.array([[1.5, -2.0], None], pa.list_(pa.float32()))}
    ).replace_schema_metadata({"k": "v"})
    coder = beam.coders.registry.get_coder(pa.Table)
    assert isinstance(coder, score_transforms.ArrowTableCoder)
    assert coder.decode(coder.encode(table)).equals(table, check_metadata=True)
    assert coder.estimate_size(table) == table.nbytes
    pipeline = beam.Pipeline()
    pattern = str(served["data"] / "impressions" / "*.parquet")
    batches = pipeline | score_transforms.ReadImpressionBatches(pattern, ["test"])
    assert batches.element_type is pa.Table
    # Run: no Arrow batch is pickled (Beam's default coder pickles what it weighs).
    pickled: list[type] = []
    dumps = pickle.dumps

    def spying(value: Any, *args: Any, **kwargs: Any) -> bytes:
        pickled.append(type(value))
        return dumps(value, *args, **kwargs)

    monkeypatch.setattr(pickle, "dumps", spying)  # what Beam's PickleCoder calls
    with BeamTestPipeline() as run:
        rows = (
            run | score_transforms.ReadImpressionBatches(pattern, ["test"]) | beam.Map(lambda t: t.num_rows)
        )
        assert_that(
            rows | beam.CombineGlobally(sum),
            equal_to([int((impressions(served["data"]).split == "test").sum())]),
        )
    assert pa.Table not in pickled


# ------------------------------------------------------------------------------- another log of one name


def simulated_folder(root: Path, seed: int) -> Path:
    """A simulated log (its spec named `log`, after the file's stem, whatever the seed) prepared,
    with its CTR history and a materialised store: what `train --mode baseline` reads."""
    log = root / "log.parquet"
    beam_args = ("--direct_num_workers", "1")
    simulate = ["--rows", "300", "--rho", "0.5", "--seed", str(seed), "--out", str(log), "--no-progress"]
    assert cli.main(["data", "simulate", *simulate]) == 0
    data = root / "d"
    assert (
        cli.main(
            ["data", "prepare", "--dataset", str(root / "log.spec.yaml"), "--out", str(data), *beam_args]
        )
        == 0
    )
    assert cli.main(["ctr-stats", "--data", str(data), *beam_args]) == 0
    assert cli.main(["features", "apply", "--data", str(data)]) == 0
    assert cli.main(["features", "materialize", "--data", str(data)]) == 0
    return data


def test_a_run_is_refused_on_another_log_of_the_same_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two simulated logs are both `log`: the spec hash train records in run.json tells them apart,
    for score-batch (unless --allow-other-dataset) and for evaluate (the run's folder re-prepared)."""
    ours, other = simulated_folder(tmp_path / "a", seed=0), simulated_folder(tmp_path / "b", seed=1)
    manifests = read_manifest(ours), read_manifest(other)
    assert manifests[0]["dataset"] == manifests[1]["dataset"] == "log"
    assert manifests[0]["spec_hash"] != manifests[1]["spec_hash"]
    config, runs = tmp_path / "quick.yaml", tmp_path / "runs"
    config.write_text(yaml.safe_dump(QUICK))
    assert cli.main(train_args(ours, runs, config, "e0")) == 0
    spec = json.loads((runs / "e0" / "run.json").read_text())
    assert (spec["dataset"], spec["spec_hash"]) == ("log", manifests[0]["spec_hash"])
    argv = ["score-batch", "--data", str(other), "--run", "e0", "--runs-dir", str(runs)]
    err = one_line(capsys, *argv)
    assert f"'log' (spec {manifests[0]['spec_hash']}, {ours})" in err
    assert (
        f"not on 'log' (spec {manifests[1]['spec_hash']}, {other})" in err and "--allow-other-dataset" in err
    )
    assert not (other / "scored").exists()
    assert cli.main([*argv, "--direct_num_workers", "1", "--allow-other-dataset"]) == 0
    assert ds.dataset(other / "scored" / "e0", format="parquet").count_rows() == 300
    assert cli.main([*argv[:2], str(ours), *argv[3:], "--direct_num_workers", "1"]) == 0  # its own: scored
    # The run's own folder re-prepared from the other log: evaluate refuses, results.json kept.
    results = (runs / "e0" / "results.json").read_bytes()
    shutil.move(ours, tmp_path / "a" / "kept")
    shutil.copytree(other, ours)
    err = one_line(capsys, "evaluate", "--run", "e0", "--runs-dir", str(runs))
    assert f"in {ours}, which now holds 'log' (spec {manifests[1]['spec_hash']})" in err
    assert (runs / "e0" / "results.json").read_bytes() == results
