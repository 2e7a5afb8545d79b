"""The same apply / materialize / get path against a real redis-server (127.0.0.1, a free port).

Skipped, with the reason, when `redis-server` is not on PATH (CI installs it).
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
import yaml
from builders import SLUG, make_dataset, write_ctr_history, write_embeddings
from feast.infra.online_stores.redis import RedisOnlineStore
from redis.backoff import NoBackoff
from redis.retry import Retry

from nlpctr.errors import UserError
from nlpctr.features import store, store_config
from nlpctr.features.local_redis import LocalRedisServer
from nlpctr.features.store_config import StoreChoice
from nlpctr.pipelines import cli, feature_store_cli, score_batch

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="redis-server is not on PATH (apt-get install redis-server); CI installs it",
    ),
]


def without_client_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Feast's Redis client with one try per call. redis-py retries a refused connection with
    backoff (~5 s) and each call 3 times (~30 s against a stopped server); one try gives the
    same verdict, and the tests need not wait for the others."""
    get_client = RedisOnlineStore._get_client

    def client_without_retries(self: RedisOnlineStore, config: Any) -> Any:
        client = get_client(self, config)
        client.set_retry(Retry(NoBackoff(), 0))
        return client

    monkeypatch.setattr(RedisOnlineStore, "_get_client", client_without_retries)


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
    store.apply(data, StoreChoice(online="redis", redis_url=server.url))
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
        store.apply(data, StoreChoice(online="redis", redis_url=server.url))


def test_switching_online_store_forgets_old_materialisation(
    server: LocalRedisServer, dataset: dict[str, Any]
) -> None:
    data = dataset["data"]
    store.apply(data)
    store.materialize(data)
    store.OnlineFeatures(data, "baseline")
    # The registry said "materialised" for SQLite; the new Redis is empty, so it must not.
    store.apply(data, StoreChoice(online="redis", redis_url=server.url))
    with pytest.raises(UserError, match="not materialised: run `nlpctr features materialize"):
        store.OnlineFeatures(data, "baseline")
    store.materialize(data)
    assert (
        store.OnlineFeatures(data, "baseline").get([{"ad_id": "x", "query_id": "y", "position": "2"}]).rows
        == 1
    )


def test_cli_names_the_unreachable_redis_in_one_line_then_recovers(
    server: LocalRedisServer, dataset: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    data, vectors = dataset["data"], dataset["vectors"]
    store.apply(data, StoreChoice(online="redis", redis_url=server.url))
    store.materialize(data)
    text = next(iter(vectors))
    get = ["features", "get", "--data", str(data), "--json", "--entity", f"ad_text_id={text}",
           "--entity", "query_text_id=none", "--entity", "ad_id=ad000", "--entity", "query_id=q",
           "--entity", "position=1"]  # fmt: skip
    materialize = ["features", "materialize", "--data", str(data)]
    server.stop()
    for argv in (get, materialize):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nlpctr: error: the Redis online store at {server.url} is unreachable")
        assert err.count("\n") == 1 and "Traceback" not in err

    # Back at the same address, but empty (it kept no data): serving must not return nulls as
    # if the keys were unknown; a rerun of materialize brings the values back.
    back = LocalRedisServer(server.workdir, port=server.port)
    try:
        assert cli.main(get) == 2
        assert "holds none of the materialised features" in capsys.readouterr().err
        assert cli.main(materialize) == 0
        capsys.readouterr()
        assert cli.main(get) == 0
        out = json.loads(capsys.readouterr().out)
        np.testing.assert_allclose(out["values"][0][f"ad_text_{SLUG}__embedding"], vectors[text], atol=1e-6)
    finally:
        back.stop()


def test_redis_lost_mid_materialize_rerun_gives_one_row_per_key(
    tmp_path: Path, dataset: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = dataset["data"]
    reference = LocalRedisServer(tmp_path / "reference")
    try:
        store.apply(data, StoreChoice(online="redis", redis_url=reference.url))
        store.materialize(data)  # never interrupted
        expected = reference.dump()
    finally:
        reference.stop()

    server = LocalRedisServer(tmp_path / "redis")
    store.apply(data, StoreChoice(online="redis", redis_url=server.url))
    config_file = store_config.config_path(data)
    config = yaml.safe_load(config_file.read_text())
    config["materialization"]["online_write_batch_size"] = 8  # many writes: lose Redis between two
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    writes = []
    write_batch = RedisOnlineStore.online_write_batch

    def write_then_lose_redis(self: RedisOnlineStore, *args: Any, **kwargs: Any) -> None:
        write_batch(self, *args, **kwargs)
        writes.append(1)
        if len(writes) == 3:
            server.stop(save=True)  # goes away, keeping what was written so far

    monkeypatch.setattr(RedisOnlineStore, "online_write_batch", write_then_lose_redis)
    without_client_retries(monkeypatch)
    with pytest.raises(UserError, match=f"Redis online store at {server.url} is unreachable"):
        store.materialize(data)
    monkeypatch.undo()
    assert len(writes) == 3

    back = LocalRedisServer(server.workdir, port=server.port)
    try:
        assert 0 < len(back.dump()) < len(expected)  # back with the first writes only
        with pytest.raises(UserError, match=r"did not finish .* half-written"):
            store.OnlineFeatures(data, "cascade_frozen")
        store.materialize(data)
        recovered = back.dump()
        assert recovered == expected  # every key, field and value of the uninterrupted run
        # One hash per entity key, each stamped by exactly one view (+ materialize's own mark).
        keys = sum(len(ds.dataset(p).to_table(columns=[k]).column(k).unique()) for p, k in online_keys(data))
        entity_hashes = {k: v for k, v in recovered.items() if not k.startswith(b"nlpctr:")}
        assert len(entity_hashes) == keys == len(recovered) - 1
        assert all(sum(f.startswith(b"_ts:") for f in fields) == 1 for fields in entity_hashes.values())
        store.OnlineFeatures(data, "cascade_frozen")
    finally:
        back.stop()


def online_keys(data: Path) -> list[tuple[Path, str]]:
    """(source folder, join key) of every online view of the dataset."""
    fs = store.open_store(data)
    return [
        (Path(v.batch_source.path), v.entity_columns[0].name) for v in fs.list_feature_views() if v.online
    ]


def test_a_redis_that_stops_answering_fails_in_one_line_not_a_hang(
    server: LocalRedisServer, dataset: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A server that accepts connections but never answers (SIGSTOP) hits the socket timeout."""
    data = dataset["data"]
    store.apply(data, StoreChoice(online="redis", redis_url=server.url))
    store.materialize(data)
    config = (data / "feature_repo" / "feature_store.yaml").read_text()
    assert "socket_timeout=5" in config and "socket_connect_timeout=3" in config
    get = ["features", "get", "--data", str(data), "--json", "--entity", "ad_id=ad000",
           "--entity", "query_id=q", "--entity", "position=1", "--service", "baseline"]  # fmt: skip
    server.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        assert cli.main(get) == 2
        elapsed = time.monotonic() - started
    finally:
        server.process.send_signal(signal.SIGCONT)
    err = capsys.readouterr().err
    assert err.startswith(f"nlpctr: error: the Redis online store at {server.url}")
    assert "unreachable" in err and err.count("\n") == 1 and "Traceback" not in err
    assert elapsed < 60  # bounded by the timeouts; it hung for more than 90 s before
    # The re-apply keeps the timeouts once, not twice.
    store.reapply(data)
    assert (data / "feature_repo" / "feature_store.yaml").read_text().count("socket_timeout=") == 1


def _score_batch_losing_redis(
    server: LocalRedisServer, data: Path, monkeypatch: pytest.MonkeyPatch, lose: Any, after_calls: int = 2
) -> list[int]:
    """Run `nlpctr score-batch` in small batches, calling `lose()` once `after_calls` lookups
    have succeeded; returns the lookups made (the ones after it fail)."""
    store.apply(data, StoreChoice(online="redis", redis_url=server.url))
    store.materialize(data)
    calls: list[int] = []
    lookup = store.OnlineFeatureLookup.__call__

    def lookup_then_lose_redis(self: Any, batch: Any) -> Any:
        if len(calls) == after_calls:
            lose()
        calls.append(batch.num_rows)
        return lookup(self, batch)

    monkeypatch.setattr(store.OnlineFeatureLookup, "__call__", lookup_then_lose_redis)
    without_client_retries(monkeypatch)
    return calls


@pytest.mark.parametrize("fault", ["killed", "stopped"])
def test_redis_lost_mid_score_batch_is_one_line_and_no_output(
    server: LocalRedisServer,
    dataset: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    """Redis killed (connection refused) or stopped (SIGSTOP: accepts, never answers) after
    a few batches were enriched: one line naming the store, exit 2, nothing written."""
    data, out = dataset["data"], dataset["data"] / "enriched_out"
    lose = server.stop if fault == "killed" else lambda: server.process.send_signal(signal.SIGSTOP)
    calls = _score_batch_losing_redis(server, data, monkeypatch, lose)
    argv = ["score-batch", "--data", str(data), "--batch-size", "8", "--out", str(out)]
    try:
        started = time.monotonic()
        assert cli.main([*argv, "--direct_num_workers", "1"]) == 2
        elapsed = time.monotonic() - started
    finally:
        if fault == "stopped":
            server.process.send_signal(signal.SIGCONT)
    assert len(calls) > 2  # the store went away partway through, not before the job
    err = capsys.readouterr().err
    assert err.startswith(f"nlpctr: error: the Redis online store at {server.url} is unreachable")
    assert err.count("\n") == 1 and "Traceback" not in err
    # Beam logs a failing step's traceback before re-raising it; not this one.
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]
    assert elapsed < 60  # the socket timeout bounds a silent server
    assert not out.exists() or not any(out.iterdir())
    assert not list(out.parent.glob(f".{out.name}.*"))  # no staging folder left behind
