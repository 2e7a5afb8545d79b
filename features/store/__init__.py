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

from nlpctr.features.store.connection import online_store_errors, probe_online_store
from nlpctr.features.store.materialization import materialize
from nlpctr.features.store.offline import historical_features, training_frame
from nlpctr.features.store.online import (
    MISSING_KEY,
    OnlineFeatureLookup,
    OnlineFeatures,
    service_feature_names,
    service_fields,
    service_join_keys,
)
from nlpctr.features.store.repo import apply, check_current, check_duckdb_path, open_store, reapply
from nlpctr.features.store.shards import (
    training_shards_dir,
    write_training_shards,
)

# ibis 12.0 (Feast's DuckDB offline store) calls DuckDB 1.5's deprecated `fetch_arrow_table`;
# harmless under the pinned versions, and printed once per view read, to every user. (After the
# imports: Feast's modules put their own DeprecationWarning filter first when imported.)
warnings.filterwarnings("ignore", message=r"fetch_arrow_table\(\) is deprecated", category=DeprecationWarning)

__all__ = [
    "MISSING_KEY",
    "OnlineFeatureLookup",
    "OnlineFeatures",
    "apply",
    "check_current",
    "check_duckdb_path",
    "historical_features",
    "materialize",
    "online_store_errors",
    "open_store",
    "probe_online_store",
    "reapply",
    "service_feature_names",
    "service_fields",
    "service_join_keys",
    "training_frame",
    "training_shards_dir",
    "write_training_shards",
]
