"""One prepared dataset's Feast store: apply, materialise, look up, build training frames.

    apply(DIR)            renders DIR/feature_repo/ (feature_store.yaml + definitions module), registers
    materialize(DIR)      loads the online views from parquet into SQLite or Redis
    OnlineFeatures(DIR, service).get(rows)   online lookup with null counts
    training_frame(DIR, service)             point-in-time join of impressions with the features
    write_training_shards(DIR, service)      the same join in DuckDB, bounded memory, into parquet shards

Feast does the point-in-time joins, materialisation and serving. What is written here is what
Feast does not do: refuse a store that is missing, stale or unreachable with a message that
names the fix, keep entity rows intact, and count what an online lookup could not find.
No Beam here (pipelines/ uses this package, not the other way round).

The modules, each importing only those above it:
- state: nlpctr's own record of what is materialised, beside Feast's registry;
- connection: reaching the online store (Redis probes, errors that name the fix);
- repo: apply / reapply, open_store, check_current;
- materialization: materialize;
- online: OnlineFeatures (row dicts), OnlineFeatureLookup (Arrow batches) and the service helpers;
- offline: historical_features and training_frame (Feast's offline store);
- shards: write_training_shards (the same join in DuckDB);
- spark_shards: the same shards written by Feast's Spark store, on a store applied for Spark.
This module is the package's interface: callers use `store.<name>`.
"""

import warnings

from nlpctr.features.store.connection import online_store_errors, ping_redis, probe_online_store
from nlpctr.features.store.materialization import materialize
from nlpctr.features.store.offline import historical_features, training_frame
from nlpctr.features.store.online import (
    MISSING_KEY,
    OnlineFeatureLookup,
    OnlineFeatures,
    OnlineLookup,
    check_materialized,
    get_service,
    normalize_entity_rows,
    service_feature_names,
    service_fields,
    service_join_keys,
)
from nlpctr.features.store.repo import apply, check_current, check_duckdb_path, open_store, reapply
from nlpctr.features.store.shards import (
    JOIN_MEMORY_LIMIT,
    SHARD_ROWS,
    ViewJoin,
    point_in_time_sql,
    service_view_joins,
    training_shards_dir,
    write_training_shards,
)
from nlpctr.features.store_config import OFFLINE_STORES

# ibis 12.0 (Feast's DuckDB offline store) calls DuckDB 1.5's deprecated `fetch_arrow_table`;
# harmless under the pinned versions, and printed once per view read, to every user. (After the
# imports: Feast's modules put their own DeprecationWarning filter first when imported.)
warnings.filterwarnings("ignore", message=r"fetch_arrow_table\(\) is deprecated", category=DeprecationWarning)

__all__ = [
    "JOIN_MEMORY_LIMIT",
    "MISSING_KEY",
    "OFFLINE_STORES",
    "SHARD_ROWS",
    "OnlineFeatureLookup",
    "OnlineFeatures",
    "OnlineLookup",
    "ViewJoin",
    "apply",
    "check_current",
    "check_duckdb_path",
    "check_materialized",
    "get_service",
    "historical_features",
    "materialize",
    "normalize_entity_rows",
    "online_store_errors",
    "open_store",
    "ping_redis",
    "point_in_time_sql",
    "probe_online_store",
    "reapply",
    "service_feature_names",
    "service_fields",
    "service_join_keys",
    "service_view_joins",
    "training_frame",
    "training_shards_dir",
    "write_training_shards",
]
