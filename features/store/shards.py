"""Training frames too big for memory: the offline point-in-time join, run by DuckDB from the
service's Feast definitions, into parquet shards that a streaming reader loads."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from feast import FeatureService, FeatureStore

from nlpctr.errors import UserError
from nlpctr.features.job_outputs import fingerprint
from nlpctr.features.names import CASCADE_FROZEN, TIMESTAMP, TRAINING_SUFFIX, training_service_name
from nlpctr.features.store.online import MISSING_KEY, get_service
from nlpctr.features.store.repo import check_current, open_store, spark_errors
from nlpctr.layout import IMPRESSIONS, TRAINING, TRAINING_META
from nlpctr.models import sql
from nlpctr.prepared import parquet_files

SHARD_ROWS = 65_536  # rows per parquet row group: the unit a streaming reader loads and shuffles
JOIN_MEMORY_LIMIT = "1GB"  # DuckDB spills to disk beyond this


@dataclass(frozen=True)
class ViewJoin:
    """One feature view as a service reads it: what an as-of join needs, read from the registry."""

    view: str
    path: Path
    timestamp_field: str
    view_keys: tuple[str, ...]  # the view's join keys
    entity_keys: tuple[str, ...]  # the entity columns they match (after the join-key map)
    ttl_seconds: float  # 0: no look-back limit
    columns: tuple[tuple[str, str], ...]  # (feature, output column `<projection>__<feature>`)


def service_view_joins(store: FeatureStore, service: FeatureService) -> list[ViewJoin]:
    """The service's projections grouped by (view, join-key map), as Feast would join them."""
    joins: dict[tuple[str, tuple[tuple[str, str], ...]], ViewJoin] = {}
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        key_map = tuple(sorted(projection.join_key_map.items()))
        view_keys = tuple(c.name for c in view.entity_columns)
        columns = tuple((f.name, f"{projection.name_to_use()}__{f.name}") for f in projection.features)
        found = joins.get((view.name, key_map))
        if found is not None:
            joins[(view.name, key_map)] = ViewJoin(**{**found.__dict__, "columns": found.columns + columns})
            continue
        joins[(view.name, key_map)] = ViewJoin(
            view=view.name,
            path=Path(view.batch_source.path),
            timestamp_field=view.batch_source.timestamp_field,
            view_keys=view_keys,
            entity_keys=tuple(dict(key_map).get(k, k) for k in view_keys),
            ttl_seconds=view.ttl.total_seconds() if view.ttl else 0.0,
            columns=columns,
        )
    return list(joins.values())


def point_in_time_sql(joins: Sequence[ViewJoin], entity: str) -> str:
    """DuckDB SQL: every row of the relation `entity`, plus each view's features as of its time.

    The semantics of Feast's point-in-time join (and of `historical_features`): for each entity
    row and view, the feature row with the same keys and the latest timestamp <= the row's
    timestamp, null when there is none or (ttl > 0) when it is older than ttl. A null key is
    asked as MISSING_KEY, as online lookups send it. Ties at one key and time are refused by
    `JobOutputs.check_unique_keys` before we get here.
    """
    ctes, selects, joins_sql = [], [], []
    for i, join in enumerate(joins):
        alias = f"v{i}"
        keys = ", ".join(
            f"CAST({sql.identifier(k)} AS VARCHAR) AS {sql.identifier(k)}" for k in join.view_keys
        )
        features = ", ".join(dict.fromkeys(sql.identifier(f) for f, _ in join.columns))
        ctes.append(
            f"{alias} AS (SELECT {keys}, "
            f"CAST({sql.identifier(join.timestamp_field)} AS TIMESTAMPTZ) AS __ts, "
            f"{features} FROM read_parquet({sql.file_list(parquet_files(join.path))}))"
        )
        on = " AND ".join(
            f"coalesce(CAST(e.{sql.identifier(ek)} AS VARCHAR), {sql.literal(MISSING_KEY)}) "
            f"= {alias}.{sql.identifier(vk)}"
            for vk, ek in zip(join.view_keys, join.entity_keys, strict=True)
        )
        joins_sql.append(f"ASOF LEFT JOIN {alias} ON {on} AND e.__entity_ts >= {alias}.__ts")
        fresh = (
            f"{alias}.__ts >= e.__entity_ts - to_seconds({join.ttl_seconds})"
            if join.ttl_seconds > 0
            else "TRUE"
        )
        for feature, column in join.columns:
            selects.append(
                f"CASE WHEN {fresh} THEN {alias}.{sql.identifier(feature)} END AS {sql.identifier(column)}"
            )
    with_sql = ",\n".join(
        [
            f"e AS (SELECT *, CAST({sql.identifier(TIMESTAMP)} AS TIMESTAMPTZ) AS __entity_ts FROM {entity})",
            *ctes,
        ]
    )
    return (
        f"WITH {with_sql}\nSELECT e.* EXCLUDE (__entity_ts), {', '.join(selects)}\n"
        f"FROM e {' '.join(joins_sql)}"
    )


def _training_service(store: FeatureStore, service: str, data_dir: Path) -> FeatureService:
    twin = service if service.endswith(TRAINING_SUFFIX) else training_service_name(service)
    return get_service(store, twin, data_dir)


def training_shards_dir(data_dir: Path, service: str) -> Path:
    """Where `write_training_shards` puts a service's training frame: `<split>/*.parquet`."""
    return Path(data_dir).resolve() / TRAINING / service


def write_training_shards(
    data_dir: Path,
    service: str = CASCADE_FROZEN,
    memory_limit: str = JOIN_MEMORY_LIMIT,
) -> Path:
    """`training_frame` for data that does not fit in memory: the same point-in-time join, run
    by DuckDB (an as-of join that spills to disk) from the service's Feast definitions, written
    as `DIR/training/<service>/<split>/part-0.parquet`, rows in impression_id order, row groups
    of SHARD_ROWS rows. On a store applied for Spark, Feast's Spark store does the join and
    Spark writes `<split>/part-*.parquet` (`spark_shards`). Reuses the shards when the
    impressions and every source are unchanged.

    Args:
        data_dir: a prepared dataset folder whose store has been applied.
        service: a serving service; its training twin is joined.
        memory_limit: DuckDB's memory limit for the join (it spills past it).

    Returns:
        The shards folder, `DIR/training/<service>/` (`training_shards_dir`).

    Raises:
        UserError: no store or an out-of-date one, an unknown service, DIR has no impressions, or
            duplicate keys in a source.
    """
    data_dir = Path(data_dir).resolve()
    store = open_store(data_dir)
    layout = check_current(store, data_dir)
    feature_service = _training_service(store, service, data_dir)
    joins = service_view_joins(store, feature_service)
    files = parquet_files(data_dir / IMPRESSIONS)
    if not files:
        raise UserError(f"{data_dir} has no impressions; run `nlpctr data prepare` into it")
    out = training_shards_dir(data_dir, service)
    identity = {
        "service": feature_service.name,
        "impressions": fingerprint(data_dir / IMPRESSIONS),
        "sources": {j.view: fingerprint(j.path) for j in joins},
        "registry": hashlib.sha1(
            json.dumps([j.__dict__ for j in joins], default=str, sort_keys=True).encode()
        ).hexdigest()[:16],
    }
    meta_path = out / TRAINING_META
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("identity") == identity:
        return out
    layout.check_unique_keys()
    staging = out.parent / f".{out.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if store.config.offline_store.type == "spark":
        from nlpctr.features.store.spark_shards import write_split_shards

        with spark_errors(store):
            rows = write_split_shards(store, joins, files, staging)
    else:
        rows = _write_split_shards(joins, files, staging, memory_limit)
    (staging / TRAINING_META).write_text(json.dumps({"identity": identity, "rows": rows}, indent=2) + "\n")
    retired = out.parent / f".{out.name}.old"
    shutil.rmtree(retired, ignore_errors=True)
    if out.exists():
        out.rename(retired)
    staging.rename(out)  # readers see the old shards or the new ones, never a mix
    shutil.rmtree(retired, ignore_errors=True)
    return out


def _write_split_shards(
    joins: Sequence[ViewJoin], files: Sequence[Path], staging: Path, memory_limit: str
) -> dict[str, int]:
    """Each split's frame as `staging/<split>/part-0.parquet` by DuckDB's as-of join; rows per split."""
    con = sql.connect(staging / ".spill", memory_limit)
    try:
        con.execute(f"CREATE VIEW impressions AS SELECT * FROM read_parquet({sql.file_list(files)})")
        present = [r[0] for r in con.execute("SELECT DISTINCT split FROM impressions ORDER BY 1").fetchall()]
        rows: dict[str, int] = {}
        for split in present:
            con.execute(
                "CREATE OR REPLACE TEMP VIEW entity AS SELECT * FROM impressions "
                f"WHERE split = {sql.literal(split)}"
            )
            (staging / split).mkdir()
            target = sql.literal(staging / split / "part-0.parquet")
            con.execute(
                f"COPY ({point_in_time_sql(joins, 'entity')} ORDER BY e.impression_id) TO {target} "
                f"(FORMAT parquet, ROW_GROUP_SIZE {SHARD_ROWS})"
            )
            rows[split] = pq.ParquetFile(staging / split / "part-0.parquet").metadata.num_rows
    finally:
        con.close()
    shutil.rmtree(staging / ".spill", ignore_errors=True)
    return rows
