"""Batch enrichment with Beam's Enrichment + FeastFeatureStoreEnrichmentHandler: per-element and
batched agree with each other, with an online lookup and with the training frame's vectors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from test_features import SLUG, impressions, make_dataset, write_ctr_history, write_embeddings

from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.pipelines import score_batch


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
    import apache_beam as beam

    row = beam.Row(ad_id="a1", query_text_id=None, position=3)
    assert score_batch.EntityRow(["ad_id", "query_text_id", "position"])(row) == {
        "ad_id": "a1",
        "query_text_id": store.MISSING_KEY,
        "position": "3",
    }
    joined = score_batch.KeepFeatures(["f__x"])({"ad_id": "a1"}, {"ad_id": "other", "f__x": 1.5, "g": 2})
    assert joined._asdict() == {"ad_id": "a1", "f__x": 1.5}
