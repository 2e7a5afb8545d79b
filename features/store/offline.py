"""Training frames through Feast's offline store: point-in-time joins that keep every entity row."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds

from nlpctr.errors import UserError
from nlpctr.features.names import CASCADE_FROZEN, TIMESTAMP, TRAINING_SUFFIX, training_service_name
from nlpctr.features.store.online import MISSING_KEY, get_service, service_join_keys
from nlpctr.features.store.repo import check_current, check_duckdb_path, open_store, spark_errors
from nlpctr.layout import IMPRESSIONS
from nlpctr.prepared import parquet_files


def historical_features(
    data_dir: Path, entity_df: pd.DataFrame, service: str, offline: str | None = None
) -> pd.DataFrame:
    """Feast's point-in-time join of `entity_df` (event_timestamp + the service's keys) with
    `service`: every input row, in order, plus `<projection>__<feature>` columns.

    Timestamps may be naive (read as UTC, as Feast does) or in any zone. Feast's offline store
    (feature_store.yaml's, or `offline`: one of OFFLINE_STORES) does the join, one call per
    feature view the service reads. Feast's file store does not keep every entity row: it drops
    a row whose keys have feature rows only after its time (or older than the view's ttl), and
    collapses rows that share a view's keys and time (feast-dev/feast#6787). So each call gets
    the distinct (keys, time) pairs of its view, and the answers are mapped back onto every
    row; a row with no value at its time gets nulls, as a point-in-time join should give. The
    DuckDB store keeps every row, returned in no set order; the same mapping orders them.

    Args:
        data_dir: a prepared dataset folder whose store has been applied.
        entity_df: rows with `event_timestamp` and the service's join keys.
        service: the feature service to join (its offline twin, for training).
        offline: an offline store to use instead of the applied one (see `open_store`).

    Returns:
        `entity_df` with a fresh index, followed by one `<projection>__<feature>` column per feature.

    Raises:
        UserError: no store or an out-of-date one, an unknown service, or join keys missing from
            `entity_df`.
        RuntimeError: Feast returned duplicate rows for one request (a bug, not bad input).
    """
    store = open_store(data_dir, offline)
    check_duckdb_path(data_dir, store.config.offline_store.type)
    check_current(store, data_dir)
    feature_service = get_service(store, service, data_dir)
    keys = service_join_keys(store, feature_service)
    missing = [c for c in [TIMESTAMP, *keys] if c not in entity_df.columns]
    if missing:
        raise UserError(f"the entity frame lacks {', '.join(missing)} (service {service} joins on {keys})")
    frame = entity_df.reset_index(drop=True)
    features: dict[str, np.ndarray] = {}  # joined columns, in the frame's row order
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[Any]] = {}
    for projection in feature_service.feature_view_projections:
        groups.setdefault((projection.name, tuple(sorted(projection.join_key_map.items()))), []).append(
            projection
        )
    for (view_name, key_map), projections in groups.items():
        view_keys = [c.name for c in store.get_feature_view(view_name).entity_columns]
        frame_keys = [dict(key_map).get(k, k) for k in view_keys]
        # A null key is asked as the empty id, as online lookups send it: a key no text has,
        # except in LM feature views, which store a missing query text under it.
        keyed = frame.assign(**{k: frame[k].fillna(MISSING_KEY) for k in frame_keys})
        group = keyed.groupby([*frame_keys, TIMESTAMP], dropna=False, sort=False).ngroup().to_numpy()
        requests = (
            keyed[[*frame_keys, TIMESTAMP]]
            .assign(__nlpctr_group=group)
            .drop_duplicates("__nlpctr_group")
            .rename(columns=dict(zip(frame_keys, view_keys, strict=True)))
        )
        refs = list(dict.fromkeys(f"{view_name}:{f.name}" for p in projections for f in p.features))
        with spark_errors(store):
            result = store.get_historical_features(
                entity_df=requests, features=refs, full_feature_names=True
            ).to_df()
        if result["__nlpctr_group"].duplicated().any() or len(result) > len(requests):
            raise RuntimeError(f"Feast returned duplicate rows joining {view_name}; refusing to guess")
        result = result.set_index("__nlpctr_group").reindex(range(len(requests)))
        for projection in projections:
            for feature in projection.features:
                column = result[f"{view_name}__{feature.name}"].to_numpy()
                features[f"{projection.name_to_use()}__{feature.name}"] = column[group]
    return pd.concat([frame, pd.DataFrame(features, index=frame.index)], axis=1)


def training_frame(
    data_dir: Path,
    service: str = CASCADE_FROZEN,
    splits: Sequence[str] | None = None,
    offline: str | None = None,
) -> pd.DataFrame:
    """Impressions joined point-in-time with a service's training twin: the leave-one-out CTR
    history (a training row never sees its own label) and the ad and query text embeddings.

    Columns: every impression column, then `<projection>__<feature>`, the same names an online
    lookup of `service` gives. `offline`: as in `historical_features`.

    Args:
        data_dir: a prepared dataset folder whose store has been applied.
        service: a serving service (its `_training` twin is joined) or the twin itself.
        splits: the splits to keep (e.g. ["train"]); None for every row.
        offline: as in `historical_features`.

    Returns:
        One row per selected impression, the impression columns then the features.

    Raises:
        UserError: DIR has no impressions, or as `historical_features`.
    """
    data_dir = Path(data_dir).resolve()
    twin = service if service.endswith(TRAINING_SUFFIX) else training_service_name(service)
    files = parquet_files(data_dir / IMPRESSIONS)
    if not files:
        raise UserError(f"{data_dir} has no impressions; run `nlpctr data prepare` into it")
    dataset = ds.dataset(files, format="parquet")
    where = pc.field("split").isin(list(splits)) if splits else None
    impressions = dataset.to_table(filter=where).to_pandas()
    return historical_features(data_dir, impressions, twin, offline)
