"""Texts first seen at lookup time: their vectors computed by the encoder behind the view, equal to
what the embedding job stores for them, through `OnlineFeatures` and `nlpctr features get`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from builders import make_dataset, write_ctr_history

from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.schema import text_id
from nlpctr.pipelines import embed_text, feature_store_cli

UNSEEN = "query words 3"  # a query of make_dataset's; the store below never saw it
ENCODER = EncoderConfig(layers=1)
QUERY = f"query_text_{ENCODER.slug}__embedding"


def stored_vectors(folder: str | Path) -> dict[str, np.ndarray]:
    table = ds.dataset(folder, format="parquet").to_table()
    return {
        t: np.asarray(v, np.float32)
        for t, v in zip(table["text_id"].to_pylist(), table["embedding"].to_pylist(), strict=True)
    }


@pytest.fixture(scope="module")
def unseen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The embed job's vectors of a dataset, and a store built from the same dataset less every
    impression of one query (so its job never embedded that query)."""
    root = tmp_path_factory.mktemp("request_time")
    full = make_dataset(root / "full", rows=120)
    job = embed_text.run(["--data", str(full), "--layers", "1"])
    data = shutil.copytree(full, root / "served", ignore=shutil.ignore_patterns("embeddings"))
    impressions = data / "impressions" / "part-00000-of-00001.parquet"
    table = pq.read_table(impressions)
    assert UNSEEN in table["query_text"].to_pylist()
    pq.write_table(table.filter(pc.invert(pc.equal(table["query_text"], UNSEEN))), impressions)
    write_ctr_history(data)
    served = embed_text.run(["--data", str(data), "--layers", "1"])
    store.apply(data)
    store.materialize(data)
    kept = table.filter(pc.invert(pc.equal(table["query_text"], UNSEEN))).slice(0, 1).to_pylist()[0]
    return {
        "data": data,
        "job": stored_vectors(job["out"]),
        "served": stored_vectors(served["out"]),
        "row": kept,
    }


def test_an_unseen_text_gets_the_vector_the_embed_job_would_store(unseen: dict[str, Any]) -> None:
    job, served, row = unseen["job"], unseen["served"], unseen["row"]
    assert text_id(UNSEEN) in job and text_id(UNSEEN) not in served
    online = store.OnlineFeatures(unseen["data"], "cascade_frozen")
    assert online.text_fields == ["ad_text", "query_text"]
    keys = {k: row[k] for k in online.keys}
    before = online.get([{**keys, "query_text_id": text_id(UNSEEN)}])  # by id alone: null, as ever
    assert before.columns[QUERY][0] is None and before.null_counts[QUERY] == 1 and before.computed == {}
    got = online.get(
        [{**{k: v for k, v in keys.items() if k != "query_text_id"}, "query_text": UNSEEN}, keys]
    )
    assert got.computed == {QUERY: 1} and got.null_counts[QUERY] == 0
    np.testing.assert_allclose(got.columns[QUERY][0], job[text_id(UNSEEN)], atol=1e-5, rtol=0)
    assert got.columns["query_text_id"][0] == text_id(UNSEEN)
    # A seen text, given as text, is read from the store, not recomputed.
    seen = online.get([{**keys, "query_text": row["query_text"]}])
    assert seen.computed == {}
    np.testing.assert_allclose(seen.columns[QUERY][0], served[row["query_text_id"]], atol=0)
    np.testing.assert_allclose(served[row["query_text_id"]], job[row["query_text_id"]], atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="is not the id of its query_text"):
        online.get([{**keys, "query_text": UNSEEN}])  # the row's own query_text_id is another text's
    with pytest.raises(UserError, match="non-empty text"):
        online.get([{**keys, "query_text_id": None, "query_text": "  "}])


def test_features_get_computes_an_unseen_query_for_an_impression(
    unseen: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    data, row = unseen["data"], unseen["row"]
    argv = [
        "get",
        "--data",
        str(data),
        "--impression",
        row["impression_id"],
        "--entity",
        f"query_text={UNSEEN}",
    ]
    out = feature_store_cli.run([*argv, "--json"])
    assert out["computed"] == {QUERY: 1} and out["rows_with_nulls"] == 0
    np.testing.assert_allclose(out["values"][0][QUERY], unseen["job"][text_id(UNSEEN)], atol=1e-5, rtol=0)
    summary = feature_store_cli.run(argv)["summary"]
    assert summary.endswith("; 1 vector(s) of unseen text computed at request time")
    capsys.readouterr()
    with pytest.raises(UserError, match="not a key of service baseline"):
        feature_store_cli.run(
            ["get", "--data", str(data), "--service", "baseline", "--entity", "query_text=x"]
        )


def test_an_encoder_that_no_longer_gives_the_stores_version_is_refused(unseen: dict[str, Any]) -> None:
    data, row = unseen["data"], unseen["row"]
    manifest_file = data / "embeddings" / ENCODER.slug / "_manifest.json"
    manifest = json.loads(manifest_file.read_text())
    keys = {"ad_id": row["ad_id"], "query_id": row["query_id"], "position": row["position"]}
    request = {**keys, "ad_text_id": row["ad_text_id"], "query_text": UNSEEN}
    try:
        # A manifest from before it recorded the encoder: its version string still says which.
        manifest_file.write_text(json.dumps({k: v for k, v in manifest.items() if k != "encoder"}))
        legacy = store.OnlineFeatures(data, "cascade_frozen").get([request])
        np.testing.assert_allclose(legacy.columns[QUERY][0], unseen["job"][text_id(UNSEEN)], atol=1e-5)
        manifest_file.write_text(
            json.dumps({**manifest, "encoder": {**manifest["encoder"], "max_length": 16}})
        )
        with pytest.raises(UserError, match=r"the store's vectors are .* but its encoder now gives"):
            store.OnlineFeatures(data, "cascade_frozen").get([request])
    finally:
        manifest_file.write_text(json.dumps(manifest))
