"""The scale-out path: Feast's Spark offline store and Spark compute engine give the default
path's answers (Spark in local mode, `local[2]`, started by `apply --offline spark`).

Skipped, with the reason, where Java or pyspark is missing; under CI (which installs both, see
.ci/run) a missing one fails instead, so the comparison cannot silently stop running.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from builders import BASE, make_dataset, write_ctr_history, write_embeddings
from test_streaming import assert_same_frames

from nlpctr.errors import UserError
from nlpctr.features import render, store, store_config
from nlpctr.pipelines import feature_store_cli


def spark_missing() -> str | None:
    try:
        store_config.require_spark()
    except UserError as error:
        return str(error)
    return None


MISSING = spark_missing()
pytestmark = pytest.mark.skipif(
    MISSING is not None and os.environ.get("CI") != "true", reason=f"{MISSING} (CI installs it)"
)


def online_rows(data: Path) -> dict[str, list[tuple]]:
    """Every row of the SQLite online store, by table."""
    with sqlite3.connect(store_config.repo_dir(data) / "data" / "online_store.db") as con:
        tables = [t for (t,) in con.execute("select name from sqlite_master where type='table'")]
        return {
            t: sorted(con.execute(f"select entity_key, feature_name, value, event_ts from {t}").fetchall())
            for t in tables
        }


def empty_online_store(data: Path) -> None:
    with sqlite3.connect(store_config.repo_dir(data) / "data" / "online_store.db") as con:
        for table in online_rows(data):
            con.execute(f"delete from {table}")


def test_spark_store_gives_the_default_stores_frames_and_online_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert MISSING is None, MISSING
    data = make_dataset(tmp_path / "ds", rows=300)
    write_ctr_history(data)
    write_embeddings(data, dim=8)
    # Three snapshots per key, one before every impression: the join must pick the latest row at
    # or before each impression's time, not any row of the key.
    path = data / "ctr_history_rows" / "part-0.parquet"
    rows = pd.read_parquet(path)
    times = [BASE - pd.Timedelta(days=1), BASE + pd.Timedelta(days=30), BASE + pd.Timedelta(days=60)]
    snapshots = pd.concat(
        [rows.assign(event_timestamp=t, position_ctr=float(k)) for k, t in enumerate(times)]
    )
    # Microseconds, as the jobs write them (models/schema.py): Spark reads no nanosecond parquet.
    snapshots.to_parquet(path, index=False, coerce_timestamps="us")
    store.apply(data)
    expected = store.training_frame(data, "cascade_frozen")
    duckdb_shards = store.write_training_shards(data, "cascade_frozen")
    expected_shards = {p.parent.name: pq.read_table(p) for p in sorted(duckdb_shards.glob("*/*.parquet"))}
    assert expected["ctr_position__position_ctr"].nunique() == 3
    store.materialize(data)
    served = online_rows(data)
    assert served and all(served.values())

    summary = feature_store_cli.run(["apply", "--data", str(data), "--offline", "spark", "--spark-master",
                                     "local[2]"])["summary"]  # fmt: skip
    assert "offline store spark on local[2]" in summary
    assert "SparkSource(" in (store_config.repo_dir(data) / render.REPO_MODULE).read_text()
    frame = store.training_frame(data, "cascade_frozen")
    assert frame.impression_id.tolist() == expected.impression_id.tolist()
    assert_same_frames(frame, expected)

    # The streamed path's shards, written by Spark: per split, the same rows in the same order
    # with the same columns and types as DuckDB's as-of join writes them.
    shutil.rmtree(duckdb_shards)
    spark_shards = store.write_training_shards(data, "cascade_frozen")
    for split, table in expected_shards.items():
        files = sorted((spark_shards / split).glob("*.parquet"))
        got = pa.concat_tables([pq.read_table(f) for f in files])
        assert got.schema.names == table.schema.names
        for name in table.schema.names:
            want, have = table.schema.field(name).type, got.schema.field(name).type
            if pa.types.is_list(want):  # Spark names a list's item `element`, DuckDB `item`
                assert pa.types.is_list(have) and have.value_type == want.value_type, name
            else:
                assert have == want, name
        assert got["impression_id"].to_pylist() == table["impression_id"].to_pylist()
        assert_same_frames(got.to_pandas(), table.to_pandas())
    assert not list(spark_shards.glob("*/_SUCCESS"))

    empty_online_store(data)
    assert not any(online_rows(data).values())
    assert "into sqlite" in store.materialize(data)["summary"]
    assert online_rows(data) == served  # byte for byte: keys, values, event times

    # Serving from a store applied for Spark needs no Java: Spark only runs the offline side.
    with monkeypatch.context() as no_java:
        no_java.delenv("JAVA_HOME", raising=False)
        no_java.setattr(shutil, "which", lambda name, *a, **k: None)
        first = str(expected.impression_id[0])
        argv = ["get", "--data", str(data), "--service", "cascade_frozen", "--impression", first, "--json"]
        looked_up = feature_store_cli.run(argv)
        assert looked_up["rows"] == 1 and looked_up["features"]

    # A trainer's reapply keeps the Spark side; and a store applied for Spark says how to leave it.
    assert store.reapply(data)["offline_store"] == "spark"
    with pytest.raises(UserError, match="--offline duckdb"):
        store.training_frame(data, "cascade_frozen", offline="duckdb")
    store.apply(data)
    assert_same_frames(store.training_frame(data, "cascade_frozen"), expected)


def test_spark_flags_are_checked_before_anything_runs(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "ds", rows=60)
    write_ctr_history(data)
    with pytest.raises(UserError, match="--spark-master goes with --offline spark"):
        feature_store_cli.run(["apply", "--data", str(data), "--spark-master", "local[2]"])
    with pytest.raises(UserError, match="must be a Spark master URL"):
        store_config.offline_config("spark", "http://example:7077")
    assert not store_config.repo_dir(data).exists()


def test_spark_without_java_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("pyspark")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    with pytest.raises(UserError, match="needs a Java 17\\+ runtime"):
        store_config.require_spark()
