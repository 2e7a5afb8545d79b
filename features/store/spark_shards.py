"""`write_training_shards` on a store applied for Spark: Feast's Spark offline store does the
point-in-time join, and the frame goes from Spark to the shards without passing through this
process's memory (the scale-out path; infra/SPARK.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pyarrow.parquet as pq
from feast import FeatureStore

from nlpctr.features.names import TIMESTAMP
from nlpctr.features.store.online import MISSING_KEY
from nlpctr.features.store.shards import ViewJoin

# Rows per shard file: Spark writes each split as range-partitioned files in impression_id order.
ROWS_PER_FILE = 1_000_000


def write_split_shards(
    store: FeatureStore, joins: Sequence[ViewJoin], files: Sequence[Path], staging: Path
) -> dict[str, int]:
    """Each split's training frame as `staging/<split>/part-*.parquet`, rows in impression_id
    order across the files: the impressions, then every `<projection>__<feature>` column, as
    `point_in_time_sql` gives them. Rows per split."""
    from feast.infra.offline_stores.contrib.spark_offline_store.spark import (
        get_spark_session_or_start_new_with_repoconfig,
    )
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    spark = get_spark_session_or_start_new_with_repoconfig(store.config.offline_store)
    impressions = spark.read.parquet(*[str(f) for f in files])
    frame = impressions
    for join in joins:
        # Feast is asked once per distinct (keys, time), as in `historical_features`; a null key
        # is asked as MISSING_KEY, as online lookups send it. Its answers are joined back here.
        # Renamed: a column of `impressions` joined back onto `impressions` is ambiguous to Spark.
        keyed = impressions.select(
            F.col("impression_id").alias("__impression"),
            TIMESTAMP,
            *[
                F.coalesce(F.col(entity).cast("string"), F.lit(MISSING_KEY)).alias(key)
                for key, entity in zip(join.view_keys, join.entity_keys, strict=True)
            ],
        )
        requests = keyed.select(*join.view_keys, TIMESTAMP).distinct()
        refs = list(dict.fromkeys(f"{join.view}:{feature}" for feature, _ in join.columns))
        answers = store.get_historical_features(entity_df=requests, features=refs, full_feature_names=True)
        served = answers.to_spark_df().select(
            *join.view_keys,
            TIMESTAMP,
            *[F.col(f"{join.view}__{feature}").alias(column) for feature, column in join.columns],
        )
        columns = [column for _, column in join.columns]
        answered = keyed.join(served, [*join.view_keys, TIMESTAMP], "left").select("__impression", *columns)
        frame = frame.join(answered, frame["impression_id"] == answered["__impression"], "left").drop(
            "__impression"
        )
    # Computed once, read once per split; spills to the executors' disks past their memory.
    frame = frame.persist(StorageLevel.MEMORY_AND_DISK)
    expected = {r["split"]: r["count"] for r in impressions.groupBy("split").count().collect()}
    rows: dict[str, int] = {}
    try:
        for split, count in sorted(expected.items()):
            (
                frame.where(F.col("split") == split)
                .repartitionByRange(max(1, math.ceil(count / ROWS_PER_FILE)), "impression_id")
                .sortWithinPartitions("impression_id")
                .write.parquet(str(staging / split))
            )
            for marker in [staging / split / "_SUCCESS", *(staging / split).glob(".*.crc")]:
                marker.unlink(missing_ok=True)  # Hadoop's bookkeeping, not data
            written = sorted((staging / split).glob("*.parquet"))
            rows[split] = sum(pq.ParquetFile(f).metadata.num_rows for f in written)
            if rows[split] != count:  # Feast's answers must map one to one onto the impressions
                raise RuntimeError(f"Spark wrote {rows[split]} rows of {split}, not {count} impressions")
    finally:
        frame.unpersist()
    return rows
