"""The Feast store of a prepared dataset: definitions, apply/materialize/get, training frames,
point-in-time pitfalls, and the errors a missing or stale store gives.

Fixtures write small prepared datasets (a few hundred impressions) with pyarrow; the CTR history
comes from the real `ctr-stats` job where the test is about its values, and embeddings are random
vectors in the embed job's layout (the encoder-level check belongs with that job).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from builders import (
    BASE,
    SLUG,
    VERSION,
    impressions,
    make_dataset,
    run_ctr_stats,
    write_ctr_history,
    write_embeddings,
)
from feast import FeatureStore

from nlpctr.errors import UserError
from nlpctr.features import render, store, store_config
from nlpctr.features.definitions import build_definitions
from nlpctr.features.job_outputs import JobOutputs


def sqlite_dump(data_dir: Path) -> list[tuple[Any, ...]]:
    """Every row of every online table, ordered."""
    path = json.loads(
        json.dumps(store_config.render_config(JobOutputs.discover(data_dir), store_config.StoreChoice()))
    )["online_store"]["path"]
    with sqlite3.connect(path) as conn:
        tables = [
            r[0] for r in conn.execute("select name from sqlite_master where type='table' order by name")
        ]
        return [(t, *row) for t in tables for row in conn.execute(f'select * from "{t}" order by 1, 2')]


def key_row(frame: pd.DataFrame, i: int, keys: list[str]) -> dict[str, Any]:
    return {k: frame[k].iloc[i] for k in keys}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A dataset with the real CTR history and one encoder, applied and materialised (SQLite)."""
    data = make_dataset(tmp_path_factory.mktemp("features") / "ds")
    run_ctr_stats(data)
    vectors = write_embeddings(data)
    applied = store.apply(data)
    store.materialize(data)
    return {"data": data, "vectors": vectors, "applied": applied, "frame": store.training_frame(data)}


# ------------------------------------------------------------------------------- definitions


def test_apply_registers_one_view_per_job_output(trained: dict[str, Any]) -> None:
    data = trained["data"]
    fs = store.open_store(data)
    views = {v.name: v for v in fs.list_feature_views()}
    assert set(views) == {"ctr_ad_id", "ctr_query_id", "ctr_position", "ctr_rows", f"text_embedding_{SLUG}"}
    assert not views["ctr_rows"].online and views["ctr_ad_id"].online
    assert views[f"text_embedding_{SLUG}"].tags["encoder_version"] == VERSION
    assert {f.name: str(f.dtype) for f in views[f"text_embedding_{SLUG}"].features}["embedding"] == (
        "Array(Float32)"
    )
    services = {s.name for s in fs.list_feature_services()}
    assert {"baseline", "cascade_frozen", f"cascade_frozen_{SLUG}", "cascade_frozen_training"} <= services
    cascade = fs.get_feature_service("cascade_frozen")
    # One embedding view, read twice through join-key maps: ad text and query text.
    text = [p for p in cascade.feature_view_projections if p.name == f"text_embedding_{SLUG}"]
    assert sorted(p.join_key_map["text_id"] for p in text) == ["ad_text_id", "query_text_id"]
    assert store.service_join_keys(fs, cascade) == [
        "ad_id",
        "query_id",
        "position",
        "ad_text_id",
        "query_text_id",
    ]
    config = (data / "feature_repo" / "feature_store.yaml").read_text()
    assert str(data / "feature_repo" / "data" / "registry.db") in config  # absolute paths
    # The written definitions module declares the same objects (what `feast plan` reads).
    module = data / "feature_repo" / "repo_definitions.py"
    built = build_definitions(JobOutputs.discover(data))
    assert render.differences(module.read_text(), module, built) == []
    assert f"text_embedding_{SLUG}_fv = FeatureView(" in module.read_text()


def test_dataset_without_query_text_gets_no_query_projection(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "noquery", rows=120, with_query=False)
    write_ctr_history(data)
    write_embeddings(data)
    store.apply(data)
    store.materialize(data)
    cascade = store.open_store(data).get_feature_service("cascade_frozen")
    names = store.service_feature_names(cascade)
    assert f"ad_text_{SLUG}__embedding" in names
    assert not any("query" in n for n in names)
    frame = store.training_frame(data)
    assert frame[f"ad_text_{SLUG}__embedding"].notna().all()


def test_nothing_to_register_is_a_user_error(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "bare", rows=20)
    with pytest.raises(UserError, match="nlpctr ctr-stats"):
        store.apply(data)


# ------------------------------------------------------------------------------- consistency


def test_online_and_offline_vectors_equal_the_parquet_vectors(trained: dict[str, Any]) -> None:
    data, vectors, frame = trained["data"], trained["vectors"], trained["frame"]
    sample = frame.drop_duplicates("ad_text_id").head(25)
    online = store.OnlineFeatures(data, "cascade_frozen")
    got = online.get([key_row(sample, i, online.keys) for i in range(len(sample))])
    for i, (ad_text, query_text) in enumerate(zip(sample.ad_text_id, sample.query_text_id, strict=True)):
        for column, tid in (
            (f"ad_text_{SLUG}__embedding", ad_text),
            (f"query_text_{SLUG}__embedding", query_text),
        ):
            expected = vectors[tid]
            np.testing.assert_allclose(np.asarray(got.columns[column][i]), expected, atol=1e-5)
            np.testing.assert_allclose(np.asarray(sample[column].iloc[i]), expected, atol=1e-5)
    assert got.rows_with_nulls == 0


def test_training_frame_keeps_every_impression_in_order(trained: dict[str, Any]) -> None:
    data, frame = trained["data"], trained["frame"]
    rows = impressions(data)
    # Rows share (ad_id, timestamp) and (ad_text_id, timestamp): none may be collapsed (feast#6787).
    assert rows.duplicated(["ad_text_id", "event_timestamp"]).any()
    assert frame.impression_id.tolist() == rows.impression_id.tolist()
    test_only = store.training_frame(data, splits=["test"])
    assert test_only.impression_id.tolist() == rows[rows.split == "test"].impression_id.tolist()


def test_training_rows_never_see_their_own_label(trained: dict[str, Any]) -> None:
    data, frame = trained["data"], trained["frame"].set_index("impression_id")
    meta = json.loads((data / "ctr_history" / "_meta.json").read_text())
    m, p0 = meta["prior_strength"], meta["global_ctr"]
    online = store.OnlineFeatures(data, "baseline")
    served = pd.DataFrame(online.get(frame.reset_index().to_dict("records")).columns).set_axis(frame.index)
    train = frame.split == "train"
    for entity in ("ad_id", "query_id", "position"):
        level = ds.dataset(data / "ctr_history" / entity).to_table().to_pandas().set_index(entity)
        clicks = frame[entity].map(level[f"{entity}_clicks"]).fillna(0)
        shown = frame[entity].map(level[f"{entity}_impressions"]).fillna(0)
        own_c, own_i = frame.clicks.where(train, 0), frame.impressions.where(train, 0)
        expected = (clicks - own_c + m * p0) / (shown - own_i + m)
        column = f"ctr_{entity}__{entity}_ctr"
        np.testing.assert_allclose(frame[column].to_numpy(float), expected.to_numpy(float), rtol=1e-9)
        assert (frame[f"ctr_{entity}__{entity}_impressions"] == shown - own_i).all()
        # Serving reads the entity level, which includes the row's own label: a clicked
        # training row must see less than serving does, a valid/test row exactly the same.
        clicked = train & (frame.clicks > 0) & frame[entity].isin(level.index)
        assert (frame.loc[clicked, column] < served.loc[clicked, column]).all()
        held_out = ~train & frame[entity].isin(level.index)
        np.testing.assert_allclose(frame.loc[held_out, column], served.loc[held_out, column], rtol=1e-9)


def test_materialize_twice_changes_nothing(trained: dict[str, Any]) -> None:
    data = trained["data"]
    before = sqlite_dump(data)
    assert len(before) > 0
    store.materialize(data)
    assert sqlite_dump(data) == before
    store.materialize(data, incremental=True)
    assert sqlite_dump(data) == before


def test_incremental_on_a_fresh_store_loads_old_rows(tmp_path: Path) -> None:
    # Feast starts a never-materialised ttl=0 view at now - 1 year; this data is from 2021.
    data = make_dataset(tmp_path / "inc", rows=60)
    write_ctr_history(data)
    vectors = write_embeddings(data)
    store.apply(data)
    result = store.materialize(data, incremental=True)
    assert result["mode"] == "incremental"
    tid = next(iter(vectors))
    got = store.OnlineFeatures(data, "cascade_frozen").get(
        [{"ad_id": "ad000", "query_id": "q", "position": "1", "ad_text_id": tid, "query_text_id": tid}]
    )
    np.testing.assert_allclose(got.columns[f"ad_text_{SLUG}__embedding"][0], vectors[tid], atol=1e-5)


def test_a_second_encoder_gets_its_own_view(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "two", rows=80)
    write_ctr_history(data)
    first = write_embeddings(data, slug="enc_a", version="encoder-a/layers=6", seed=1)
    second = write_embeddings(data, slug="enc_b", version="encoder-b/layers=2", seed=2)
    with pytest.raises(UserError, match="--encoder"):
        store.apply(data)
    applied = store.apply(data, encoder="enc_b")
    assert {"text_embedding_enc_a", "text_embedding_enc_b"} <= set(applied["feature_views"])
    assert store.reapply(data)["default_encoder"] == "enc_b"  # as a trainer re-applies
    store.materialize(data)
    tid = next(iter(first))
    row = {"ad_id": "ad000", "query_id": "q", "position": "1", "ad_text_id": tid, "query_text_id": tid}
    for service, slug, vectors in (
        ("cascade_frozen_enc_a", "enc_a", first),
        ("cascade_frozen_enc_b", "enc_b", second),
        ("cascade_frozen", "enc_b", second),
    ):
        got = store.OnlineFeatures(data, service).get([row])
        assert [n for n in got.feature_names if "embedding" in n] == [
            f"ad_text_{slug}__embedding",
            f"query_text_{slug}__embedding",
        ]
        np.testing.assert_allclose(got.columns[f"ad_text_{slug}__embedding"][0], vectors[tid], atol=1e-5)
    assert not np.allclose(first[tid], second[tid])
    # A stray file of another encoder inside a view's folder is refused, not mixed in.
    table = pq.read_table(data / "embeddings" / "enc_a")
    stray = table.set_column(2, "encoder_version", pa.array(["encoder-c"] * len(table), pa.string()))
    pq.write_table(stray.slice(0, 3), data / "embeddings" / "enc_a" / "part-stray.parquet")
    with pytest.raises(UserError, match="mixes encoder versions"):
        store.apply(data, encoder="enc_b")
    with pytest.raises(UserError, match="mixes encoder versions"):
        store.OnlineFeatures(data, "cascade_frozen")
    # An encoder's output removed: its view, services and online table go on the next apply.
    shutil.rmtree(data / "embeddings" / "enc_a")
    again = store.apply(data)  # one encoder left, so no --encoder needed
    assert {"text_embedding_enc_a", "cascade_frozen_enc_a", "cascade_frozen_enc_a_training"} <= set(
        again["deleted"]
    )
    assert "text_embedding_enc_a" not in {v.name for v in store.open_store(data).list_feature_views()}
    assert not any(row[0].endswith("_text_embedding_enc_a") for row in sqlite_dump(data))
    assert any(row[0].endswith("_text_embedding_enc_b") for row in sqlite_dump(data))


# ------------------------------------------------------------------------------- unknown and missing


def test_unknown_entities_come_back_null_and_counted(trained: dict[str, Any]) -> None:
    from nlpctr.pipelines import feature_store_cli

    data, frame = trained["data"], trained["frame"]
    online = store.OnlineFeatures(data, "cascade_frozen")
    known = key_row(frame, 0, online.keys)
    unknown = dict.fromkeys(online.keys, "no-such-key")
    no_query = {**known, "query_text_id": None}
    got = online.get([known, unknown, no_query])
    assert got.rows == 3 and got.rows_with_nulls == 2
    assert got.null_counts[f"query_text_{SLUG}__embedding"] == 2
    assert got.null_counts["ctr_ad_id__ad_id_ctr"] == 1
    assert all(got.columns[name][1] is None for name in got.feature_names)
    out = feature_store_cli.run(
        [
            *("get", "--data", str(data), "--service", "baseline", "--json"),
            *("--entity", "ad_id=nope", "--entity", f"query_id={known['query_id']}"),
            *("--entity", "position=1", "--entity", "position=99"),
        ]
    )
    assert out["rows"] == 2 and out["rows_with_nulls"] == 2
    assert out["null_counts"]["ctr_ad_id__ad_id_ctr"] == 2
    assert out["null_counts"]["ctr_position__position_ctr"] == 1
    assert out["null_counts"]["ctr_query_id__query_id_ctr"] == 0


def test_missing_or_stale_store_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = make_dataset(tmp_path / "missing", rows=60)
    with pytest.raises(UserError, match="nlpctr features apply --data"):
        store.OnlineFeatures(data, "baseline")
    with pytest.raises(UserError, match="nlpctr features apply --data"):
        store.training_frame(data)
    write_ctr_history(data)
    store.apply(data)
    with pytest.raises(UserError, match="not materialised: run `nlpctr features materialize --data"):
        store.OnlineFeatures(data, "baseline")
    with pytest.raises(UserError, match="no feature service 'cascade_frozen'"):
        store.OnlineFeatures(data, "cascade_frozen")
    store.materialize(data)
    store.OnlineFeatures(data, "baseline")
    time.sleep(0.01)  # a new mtime, even on coarse clocks
    write_ctr_history(data, prior_strength=3.0)
    with pytest.raises(
        UserError, match="changed since it was materialised: run `nlpctr features materialize"
    ):
        store.OnlineFeatures(data, "baseline")
    write_embeddings(data)
    with pytest.raises(UserError, match=r"out of date .*new: text_embedding_.*nlpctr features apply"):
        store.training_frame(data)

    # Through the CLI: one line on stderr, exit 2, no traceback.
    from nlpctr.pipelines import cli

    monkeypatch.setitem(cli.COMMANDS, ("features",), ("nlpctr.pipelines.feature_store_cli", "feature store"))
    capsys.readouterr()
    code = cli.main(["features", "get", "--data", str(data), "--service", "baseline", "--entity", "ad_id=x"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("nlpctr: error: ") and err.count("\n") == 1 and "Traceback" not in err


# ------------------------------------------------------------------------------- point in time


def test_naive_utc_and_zoned_entity_timestamps_join_alike(trained: dict[str, Any]) -> None:
    data = trained["data"]
    rows = impressions(data).head(40)
    # One row exactly at the snapshot time (the first impression): `<=` must include it.
    assert rows.event_timestamp.min() == impressions(data).event_timestamp.min()
    aware = store.historical_features(data, rows, "cascade_frozen_training")
    naive = store.historical_features(
        data, rows.assign(event_timestamp=rows.event_timestamp.dt.tz_convert(None)), "cascade_frozen_training"
    )
    zoned = store.historical_features(
        data,
        rows.assign(event_timestamp=rows.event_timestamp.dt.tz_convert("America/New_York")),
        "cascade_frozen_training",
    )
    features = [c for c in aware.columns if "__" in c]
    assert aware[features].notna().all().all()
    for other in (naive, zoned):
        assert other.impression_id.tolist() == aware.impression_id.tolist()
        for column in features:
            left, right = aware[column].to_list(), other[column].to_list()
            assert all(np.allclose(a, b) for a, b in zip(left, right, strict=True)), column
    # Shift the naive times back a day: now before every snapshot, so everything is null.
    early = rows.assign(event_timestamp=rows.event_timestamp.dt.tz_convert(None) - pd.Timedelta(days=1))
    before = store.historical_features(data, early.head(5), "baseline_training")
    assert before[[c for c in before.columns if "__" in c]].isna().all().all()


def test_keys_with_several_rows_at_one_time_are_refused(tmp_path: Path) -> None:
    # feast#3360: 3+ rows of one key with different created timestamps -> an arbitrary row.
    data = make_dataset(tmp_path / "dupes", rows=60)
    write_ctr_history(data)
    path = data / "ctr_history" / "ad_id" / "part-0.parquet"
    level = pd.read_parquet(path)
    restated = [
        level.assign(ad_id_ctr=level.ad_id_ctr + k, created_timestamp=BASE + pd.Timedelta(hours=k))
        for k in range(3)
    ]
    pd.concat(restated).to_parquet(path, index=False)
    with pytest.raises(UserError, match="3360"):
        store.apply(data)


def test_snapshots_over_time_pick_the_latest_at_each_time(tmp_path: Path) -> None:
    # Three snapshots per key at three event times: offline picks the latest <= the row's time,
    # online the newest; materialize (pull_latest_features) must agree.
    data = make_dataset(tmp_path / "snapshots", rows=100)
    write_ctr_history(data)
    path = data / "ctr_history" / "position" / "part-0.parquet"
    level = pd.read_parquet(path)
    times = [BASE - pd.Timedelta(days=1), BASE + pd.Timedelta(days=30), BASE + pd.Timedelta(days=60)]
    shuffled = pd.concat(
        [level.assign(event_timestamp=t, position_ctr=float(k)) for k, t in enumerate(times)]
    )
    shuffled.sample(frac=1.0, random_state=0).to_parquet(path, index=False)
    store.apply(data)
    store.materialize(data)
    rows = impressions(data)
    rows = rows[rows.position.isin(level.position)]
    frame = store.historical_features(data, rows, "baseline")
    expected = np.select(
        [rows.event_timestamp >= times[2], rows.event_timestamp >= times[1]], [2.0, 1.0], default=0.0
    )
    np.testing.assert_array_equal(frame["ctr_position__position_ctr"].to_numpy(float), expected)
    assert len(set(expected)) == 3
    online = store.OnlineFeatures(data, "baseline")
    got = online.get(rows.head(10).to_dict("records"))
    assert got.columns["ctr_position__position_ctr"] == [2.0] * 10


def test_ttl_is_an_offline_lookback_not_an_online_expiry(tmp_path: Path) -> None:
    # feast#4133: a view's ttl bounds how far back a point-in-time join looks; online reads ignore
    # it. Our views use ttl=0 so an offline read of the serving views sees what serving sees.
    data = make_dataset(tmp_path / "ttl", rows=150)
    write_ctr_history(data)
    store.apply(data)
    rows = impressions(data)
    late = rows[rows.event_timestamp > BASE + pd.Timedelta(days=40)]
    assert len(late) > 0
    default = store.historical_features(data, late, "baseline")
    assert default["ctr_position__position_ctr"].notna().all()

    fs = FeatureStore(repo_path=str(store_config.repo_dir(data)))
    fs.apply(build_definitions(JobOutputs.discover(data), ttl=timedelta(days=30)).objects())
    assert fs.get_feature_view("ctr_position").ttl == timedelta(days=30)
    store.materialize(data)
    short = store.historical_features(data, late, "baseline")
    assert short["ctr_position__position_ctr"].isna().all()  # snapshot older than 30 days
    early = rows[rows.event_timestamp < BASE + pd.Timedelta(days=20)]
    assert store.historical_features(data, early, "baseline")["ctr_position__position_ctr"].notna().all()
    served = store.OnlineFeatures(data, "baseline").get(late.head(5).to_dict("records"))
    assert served.null_counts["ctr_position__position_ctr"] == 0  # online still serves it


def test_rows_sharing_keys_and_time_are_all_kept(trained: dict[str, Any]) -> None:
    # feast#6787: the file store collapses entity rows that share a view's keys and time. Rows
    # sharing (ad_id, time) and differing in position must each get their own features.
    data = trained["data"]
    rows = impressions(data)
    shared = rows[rows.duplicated(["ad_id", "event_timestamp"], keep=False)]
    assert len(shared) >= 2 and shared.position.nunique() > 1
    frame = store.historical_features(data, shared, "baseline")
    assert frame.impression_id.tolist() == shared.impression_id.tolist()
    served = store.OnlineFeatures(data, "baseline").get(shared.to_dict("records"))
    for name in served.feature_names:
        offline = frame[name].astype(float).to_numpy()
        online = np.array([np.nan if v is None else v for v in served.columns[name]], dtype=float)
        np.testing.assert_allclose(offline, online, rtol=1e-9)


# ------------------------------------------------------------------------------- stock feast CLI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_stock_feast_cli_lists_and_serves_the_repo(trained: dict[str, Any]) -> None:
    from click.testing import CliRunner
    from feast.cli.cli import cli as feast_cli

    data, frame = trained["data"], trained["frame"]
    repo = str(data / "feature_repo")
    listed = CliRunner().invoke(feast_cli, ["-c", repo, "feature-views", "list"])
    assert listed.exit_code == 0, listed.output
    assert f"text_embedding_{SLUG}" in listed.output and "ctr_rows" in listed.output

    port = _free_port()
    feast = Path(sys.executable).with_name("feast")
    server = subprocess.Popen(
        [str(feast), "-c", repo, "serve", "-h", "127.0.0.1", "-p", str(port), "--no-access-log"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            assert time.monotonic() < deadline, "feast serve did not come up in 90 s"
            time.sleep(0.5)
        online = store.OnlineFeatures(data, "cascade_frozen")
        rows = [key_row(frame, i, online.keys) for i in range(3)]
        body = {
            "feature_service": "cascade_frozen",
            "entities": {k: [r[k] for r in rows] for k in online.keys},
            "full_feature_names": True,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/get-online-features",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as reply:
            payload = json.loads(reply.read())
        names = payload["metadata"]["feature_names"]
        served = {n: r["values"] for n, r in zip(names, payload["results"], strict=True)}
        expected = online.get(rows)
        for name in expected.feature_names:
            np.testing.assert_allclose(
                np.asarray(served[name], dtype=float),
                np.asarray(expected.columns[name], dtype=float),
                atol=1e-6,
            )
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
