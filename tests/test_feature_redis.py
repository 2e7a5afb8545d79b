"""The same apply / materialize / get path against a real redis-server (127.0.0.1, a free port).

Skipped, with the reason, when `redis-server` is not on PATH (CI installs it).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
from test_features import SLUG, make_dataset, write_ctr_history, write_embeddings

from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.features.local_redis import LocalRedisServer
from nlpctr.pipelines import feature_store_cli, score_batch

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="redis-server is not on PATH (apt-get install redis-server); CI installs it",
    ),
]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LocalRedisServer]:
    running = LocalRedisServer(tmp_path)
    yield running
    running.stop()


@pytest.fixture
def dataset(tmp_path: Path) -> dict[str, Any]:
    data = make_dataset(tmp_path / "ds", rows=120, seed=5)
    write_ctr_history(data)
    return {"data": data, "vectors": write_embeddings(data, seed=5)}


def test_apply_materialize_get_on_redis(server: LocalRedisServer, dataset: dict[str, Any]) -> None:
    data, vectors = dataset["data"], dataset["vectors"]
    applied = feature_store_cli.run(
        ["apply", "--data", str(data), "--online", "redis", "--redis-url", server.url]
    )
    assert applied["online_store"] == "redis"
    assert f"connection_string: {server.url}" in (data / "feature_repo" / "feature_store.yaml").read_text()
    feature_store_cli.run(["materialize", "--data", str(data)])
    before = server.dump()
    assert len(before) > 0

    online = store.OnlineFeatures(data, "cascade_frozen")
    assert online.store.config.online_store.type == "redis"
    texts = list(vectors)[:10]
    rows = [
        {"ad_id": "ad000", "query_id": "q", "position": "1", "ad_text_id": t, "query_text_id": t}
        for t in texts
    ]
    got = online.get([*rows, dict.fromkeys(online.keys, "unknown")])
    for i, tid in enumerate(texts):
        for role in ("ad_text", "query_text"):
            np.testing.assert_allclose(got.columns[f"{role}_{SLUG}__embedding"][i], vectors[tid], atol=1e-5)
    level = ds.dataset(data / "ctr_history" / "position").to_table().to_pandas().set_index("position")
    assert got.columns["ctr_position__position_ctr"][0] == pytest.approx(level.loc["1", "position_ctr"])
    assert got.null_counts[f"ad_text_{SLUG}__embedding"] == 1  # only the unknown row
    assert all(got.columns[name][-1] is None for name in got.feature_names)

    # Re-materialising the same inputs leaves every key and value as it was.
    feature_store_cli.run(["materialize", "--data", str(data)])
    assert server.dump() == before
    feature_store_cli.run(["materialize", "--data", str(data), "--incremental"])
    assert server.dump() == before

    out = feature_store_cli.run(
        [
            "get",
            "--data",
            str(data),
            "--service",
            "baseline",
            "--json",
            "--entity",
            "ad_id=nope",
            "--entity",
            "query_id=nope",
            "--entity",
            "position=1",
        ]
    )
    assert out["rows_with_nulls"] == 1 and out["null_counts"]["ctr_position__position_ctr"] == 0

    # Beam reads the Redis store the way serving does.
    result = score_batch.run(["--data", str(data), "--splits", "test", "--out", str(data / "enriched_redis")])
    frame = ds.dataset(data / "enriched_redis").to_table().to_pandas()
    assert result["rows"] == len(frame) > 0
    for tid, vector in zip(frame.ad_text_id, frame[f"ad_text_{SLUG}__embedding"], strict=True):
        np.testing.assert_allclose(vector, vectors[tid], atol=1e-5)


def test_redis_down_names_the_fix(server: LocalRedisServer, dataset: dict[str, Any]) -> None:
    data = dataset["data"]
    store.apply(data, online="redis", redis_url=server.url)
    store.materialize(data)
    store.OnlineFeatures(data, "baseline")
    server.stop()
    with pytest.raises(UserError, match=f"Redis online store at {server.url} is unreachable.*redis-server"):
        store.OnlineFeatures(data, "baseline")
    with pytest.raises(UserError, match="unreachable"):
        store.materialize(data)
    with pytest.raises(UserError, match="unreachable"):
        score_batch.run(["--data", str(data), "--service", "baseline"])
    with pytest.raises(UserError, match="unreachable"):
        store.apply(data, online="redis", redis_url=server.url)


def test_switching_online_store_forgets_old_materialisation(
    server: LocalRedisServer, dataset: dict[str, Any]
) -> None:
    data = dataset["data"]
    store.apply(data)
    store.materialize(data)
    store.OnlineFeatures(data, "baseline")
    # The registry said "materialised" for SQLite; the new Redis is empty, so it must not.
    store.apply(data, online="redis", redis_url=server.url)
    with pytest.raises(UserError, match="not materialised: run `nlpctr features materialize"):
        store.OnlineFeatures(data, "baseline")
    store.materialize(data)
    assert (
        store.OnlineFeatures(data, "baseline").get([{"ad_id": "x", "query_id": "y", "position": "2"}]).rows
        == 1
    )
