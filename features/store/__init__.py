"""One prepared dataset's Feast store: apply, materialise, look up, build training frames.

    apply(DIR)  materialize(DIR)  OnlineFeatures(DIR, service).get(rows)
    training_frame(DIR, service)  write_training_shards(DIR, service)

Feast does the joins, materialisation and serving; this package refuses a missing, stale or
unreachable store with a message naming the fix, keeps entity rows intact and counts what a
lookup could not find. No Beam here. Callers use `store.<name>`; the modules (state,
connection, repo, materialization, online, offline, shards, spark_shards): docs/DESIGN.md,
"Modules in detail", features/store.
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
