"""One prepared dataset's Feast store: render, apply, materialise, look up, build training frames.

    apply(DIR)            renders DIR/feature_repo/ (feature_store.yaml + definitions module), registers
    materialize(DIR)      loads the online views from parquet into SQLite or Redis
    OnlineFeatures(DIR, service).get(rows)   online lookup with null counts
    training_frame(DIR, service)             point-in-time join of impressions with the features
    write_training_shards(DIR, service)      the same join in DuckDB, bounded memory, into parquet shards

Feast does the point-in-time joins, materialisation and serving. What is written here is what
Feast does not do: refuse a store that is missing, stale or unreachable with a message that
names the fix, keep entity rows intact, and count what an online lookup could not find.
No Beam here (pipelines/ uses this module, not the other way round).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import yaml
from feast import FeatureService, FeatureStore, FeatureView

from nlpctr.errors import UserError
from nlpctr.features.definitions import (
    CASCADE_FROZEN,
    TIMESTAMP,
    TRAINING_SUFFIX,
    Layout,
    build_definitions,
    embedding_view_name,
    fingerprint,
    parquet_files,
    training_service_name,
)
from nlpctr.features.render import (
    CONFIG_FILE,
    REDIS_TIMEOUTS,
    REPO_MODULE,
    check_module,
    config_path,
    config_text,
    read_encoder,
    render_config,
    render_module,
    repo_dir,
)

# The repo's layout and configuration are rendered in render.py; these stay importable from here.
from nlpctr.features.render import DEFAULT_REDIS_URL as DEFAULT_REDIS_URL
from nlpctr.features.render import ONLINE_STORES as ONLINE_STORES
from nlpctr.features.render import project_name as project_name
from nlpctr.layout import IMPRESSIONS, TRAINING, TRAINING_META
from nlpctr.models import sql

STATE_FILE = "nlpctr_state.json"
# Feast's online store cannot take a null join key (it sorts keys by value); an impression with
# no query text is looked up under this id, which no text has, and comes back null.
MISSING_KEY = ""


def _fix(verb: str, data_dir: Path) -> str:
    return f"`nlpctr features {verb} --data {Path(data_dir).resolve()}`"


# ------------------------------------------------------------------------------- state


def _state_path(data_dir: Path) -> Path:
    return repo_dir(data_dir) / "data" / STATE_FILE


def _read_state(data_dir: Path) -> dict[str, Any]:
    path = _state_path(data_dir)
    return json.loads(path.read_text()) if path.is_file() else {"materialized": {}}


def _write_state(data_dir: Path, state: dict[str, Any]) -> None:
    """Write the state file whole or not at all (a process killed mid-write leaves the old one)."""
    path = _state_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    os.replace(partial, path)


def _node(connection_string: str) -> str:
    """HOST:PORT of a Redis connection string's first node (not its client parameters)."""
    return connection_string.split(",")[0]


def _unreachable(connection_string: str, exc: BaseException) -> UserError:
    return UserError(
        f"the Redis online store at {_node(connection_string)} is unreachable ({str(exc).splitlines()[0]}); "
        "start redis-server there, or re-apply with `--online redis --redis-url HOST:PORT` "
        "(or `--online sqlite`)"
    )


@contextlib.contextmanager
def online_store_errors(store: FeatureStore) -> Iterator[None]:
    """Turn an online store that stops answering mid-call into a UserError that names the fix."""
    import redis.exceptions

    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise _unreachable(getattr(store.config.online_store, "connection_string", "?"), exc) from None


@contextlib.contextmanager
def _redis(connection_string: str) -> Iterator[Any]:
    """A client of the (first) Redis node, without retries: redis-py retries a refused
    connection with backoff for several seconds per call, one try gives the same verdict."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    host, _, port = _node(connection_string).partition(":")
    client = redis.Redis(
        host=host,
        port=int(port or 6379),
        socket_connect_timeout=REDIS_TIMEOUTS["socket_connect_timeout"],
        socket_timeout=REDIS_TIMEOUTS["socket_timeout"],
        retry=Retry(NoBackoff(), 0),
    )
    try:
        yield client
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise _unreachable(connection_string, exc) from None
    finally:
        client.close()


def ping_redis(connection_string: str) -> None:
    """Fail fast, with the fix, when a Redis server does not answer a PING."""
    with _redis(connection_string) as client:
        client.ping()


def _single_redis(store: FeatureStore) -> str | None:
    """The connection string of a single-node Redis online store; None for SQLite (or a cluster)."""
    config = store.config.online_store
    kind = getattr(config, "redis_type", None)
    return (
        config.connection_string
        if config.type == "redis" and getattr(kind, "value", kind) == "redis"
        else None
    )


def probe_online_store(store: FeatureStore) -> None:
    """Ping a (single-node) Redis online store before using it; SQLite needs no probe."""
    if (url := _single_redis(store)) is not None:
        ping_redis(url)


# A Redis that restarts without persistence (or is flushed) comes back empty, and every lookup
# would then read as "unknown key". materialize leaves this hash in Redis (under the project,
# so each dataset has its own); serving checks that it is still there.
def _materialized_mark(store: FeatureStore) -> str:
    return f"nlpctr:{store.config.project}:materialized"


def _write_mark(store: FeatureStore) -> None:
    if (url := _single_redis(store)) is not None:
        with _redis(url) as client:
            client.hset(_materialized_mark(store), "by", "nlpctr features materialize")


def _check_mark(store: FeatureStore, data_dir: Path) -> None:
    if (url := _single_redis(store)) is None:
        return
    with _redis(url) as client:
        found = client.exists(_materialized_mark(store))
    if not found:
        raise UserError(
            f"the Redis online store at {_node(url)} holds none of the materialised features of "
            f"{Path(data_dir).resolve()} (restarted without persistence, or flushed?): "
            f"run {_fix('materialize', data_dir)}"
        )


# ------------------------------------------------------------------------------- apply


def apply(
    data_dir: Path, online: str = "sqlite", redis_url: str | None = None, encoder: str | None = None
) -> dict[str, Any]:
    """Render DIR/feature_repo/ and register DIR's entities, views and services with Feast.

    Objects from an earlier apply that the jobs' outputs no longer back are deleted. If the
    online store changed (SQLite <-> Redis, another Redis), the registry starts afresh, since
    its materialisation records would describe the old store.
    """
    layout = Layout.discover(data_dir)
    if not layout.ctr and not layout.embeddings:
        raise UserError(
            f"nothing to register in {layout.data_dir}: run `nlpctr ctr-stats --data {layout.data_dir}` "
            f"and/or `nlpctr embed --data {layout.data_dir}` first"
        )
    layout.check_unique_keys()
    definitions = build_definitions(layout, encoder=encoder)
    config = render_config(layout, online, redis_url)
    if online == "redis":
        ping_redis(config["online_store"]["connection_string"])  # before touching the old store
    repo = repo_dir(layout.data_dir)
    data = repo / "data"
    old_config = yaml.safe_load((repo / CONFIG_FILE).read_text()) if (repo / CONFIG_FILE).is_file() else None
    if old_config is not None and (
        old_config.get("online_store") != config["online_store"]
        or old_config.get("project") != config["project"]
    ):
        shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True, exist_ok=True)
    (repo / CONFIG_FILE).write_text(config_text(config, online))
    module = render_module(definitions, layout.data_dir, layout.dataset)
    check_module(module, repo / REPO_MODULE, definitions)  # what `feast plan` reads is what we apply
    (repo / REPO_MODULE).write_text(module)

    store = FeatureStore(repo_path=str(repo))
    wanted = {type(o).__name__ + ":" + o.name for o in definitions.objects()}
    existing = [
        *store.list_feature_services(),
        *store.list_feature_views(),
        *store.list_data_sources(),
        *store.list_entities(),
    ]
    stale = [o for o in existing if type(o).__name__ + ":" + o.name not in wanted]
    with online_store_errors(store):
        store.apply(definitions.objects(), objects_to_delete=stale, partial=False)
    state = _read_state(layout.data_dir)
    state["materialized"] = {k: v for k, v in state.get("materialized", {}).items() if k in definitions.views}
    _write_state(layout.data_dir, state)
    views = sorted(definitions.views)
    services = sorted(definitions.services)
    summary = (
        f"applied {config['project']}: {len(definitions.entities)} entities, {len(views)} feature views "
        f"({', '.join(views)}), {len(services)} services ({', '.join(services)}); "
        f"online store {online}"
        + (f" at {config['online_store']['connection_string']}" if online == "redis" else "")
        + f"; deleted {len(stale)} stale object(s) -> {repo}"
    )
    return {
        "project": config["project"],
        "repo": str(repo),
        "online_store": online,
        "entities": sorted(definitions.entities),
        "feature_views": views,
        "feature_services": services,
        "default_encoder": definitions.default_encoder,
        "deleted": sorted(o.name for o in stale),
        "summary": summary,
    }


def reapply(data_dir: Path) -> dict[str, Any]:
    """`apply` again with the online store and encoder the last apply chose (after a job, such
    as a trainer, adds a view); a fresh dataset gets the defaults."""
    repo = repo_dir(data_dir)
    online, redis_url, encoder = "sqlite", None, None
    if (repo / CONFIG_FILE).is_file():
        config = yaml.safe_load((repo / CONFIG_FILE).read_text())
        if config.get("online_store", {}).get("type") == "redis":
            online, redis_url = "redis", config["online_store"].get("connection_string")
    if (repo / REPO_MODULE).is_file():
        encoder = read_encoder((repo / REPO_MODULE).read_text())
    return apply(data_dir, online=online, redis_url=redis_url, encoder=encoder)


def open_store(data_dir: Path) -> FeatureStore:
    """The applied store of DIR, or a UserError that says to run apply."""
    path = config_path(data_dir)
    registry = repo_dir(data_dir) / "data" / "registry.db"
    if not path.is_file() or not registry.is_file():
        raise UserError(f"{Path(data_dir).resolve()} has no feature store yet: run {_fix('apply', data_dir)}")
    return FeatureStore(repo_path=str(repo_dir(data_dir)))


def check_current(store: FeatureStore, data_dir: Path) -> Layout:
    """Refuse a registry that no longer matches what the jobs wrote (views added, removed, or
    an encoder folder now holding another encoder)."""
    layout = Layout.discover(data_dir)
    registered = {v.name: v for v in store.list_feature_views(allow_cache=False)}
    expected = layout.sources()
    added, gone = sorted(set(expected) - set(registered)), sorted(set(registered) - set(expected))
    changed = sorted(
        e.slug
        for e in layout.embeddings
        if (view := registered.get(embedding_view_name(e.slug))) is not None
        and view.tags.get("encoder_version") != e.encoder_version
    )
    if added or gone or changed:
        parts = [f"new: {', '.join(added)}"] * bool(added) + [f"gone: {', '.join(gone)}"] * bool(gone)
        parts += [f"encoder changed: {', '.join(changed)}"] * bool(changed)
        raise UserError(
            f"the feature store of {layout.data_dir} is out of date ({'; '.join(parts)}): "
            f"run {_fix('apply', data_dir)} then {_fix('materialize', data_dir)}"
        )
    return layout


# ------------------------------------------------------------------------------- materialize


def _timestamp_range(paths: Sequence[Path]) -> tuple[datetime, datetime] | None:
    low = high = None
    for path in paths:
        column = ds.dataset(parquet_files(path), format="parquet").to_table(columns=[TIMESTAMP])[TIMESTAMP]
        if len(column) == 0:
            continue
        bounds = pc.min_max(column).as_py()
        low = bounds["min"] if low is None else min(low, bounds["min"])
        high = bounds["max"] if high is None else max(high, bounds["max"])
    if low is None or high is None:
        return None
    return _utc(low), _utc(high)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def materialize(
    data_dir: Path,
    start: datetime | None = None,
    end: datetime | None = None,
    incremental: bool = False,
    views: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Load the online views of DIR into the online store.

    Default: the whole of every source (from its earliest event time), which is what a re-run
    job needs, since its rows keep data-time timestamps. `incremental`: from each view's last
    materialised end; a view never materialised gets the full range, because Feast would start a
    ttl=0 view at "now - 1 year" and skip older data. `start`/`end`: an explicit window.
    `views` limits it to these views (a trainer publishing one new LM feature view).
    """
    store = open_store(data_dir)
    layout = check_current(store, data_dir)
    layout.check_unique_keys()
    only = set(views) if views is not None else None
    views = [
        v
        for v in store.list_feature_views(allow_cache=False)
        if v.online and (only is None or v.name in only)
    ]
    if not views:
        raise UserError(f"no online feature views in {layout.data_dir}; run {_fix('apply', data_dir)}")
    paths = {v.name: Path(v.batch_source.path) for v in views}
    span = _timestamp_range(list(paths.values()))
    if span is None:
        raise UserError(
            f"the online views of {layout.data_dir} have no rows; re-run the jobs that write them"
        )
    now = datetime.now(UTC)
    end = _utc(end) if end else max(now, span[1] + timedelta(seconds=1))
    probe_online_store(store)
    # Until the end, these views count as half-written: Feast records each view as materialised
    # as soon as its own rows are in, so a run killed (or a Redis lost) midway would otherwise
    # leave a store that says "materialised" beside a view that is only partly there.
    state = _read_state(layout.data_dir)
    for name in paths:
        state.setdefault("materialized", {}).pop(name, None)
    state["unfinished"] = sorted(set(state.get("unfinished", [])) | set(paths))
    _write_state(layout.data_dir, state)
    started = datetime.now(UTC)
    with online_store_errors(store):
        if start is not None:
            mode = "window"
            store.materialize(_utc(start), end, feature_views=[v.name for v in views])
        elif incremental:
            mode = "incremental"
            fresh = [v.name for v in views if not v.materialization_intervals]
            seen = [v.name for v in views if v.materialization_intervals]
            if fresh:
                store.materialize(span[0], end, feature_views=fresh)
            if seen:
                store.materialize_incremental(end, feature_views=seen)
        else:
            mode = "full"
            store.materialize(span[0], end, feature_views=[v.name for v in views])
    seconds = (datetime.now(UTC) - started).total_seconds()
    rows = {
        name: sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(p)) for name, p in paths.items()
    }
    state = _read_state(layout.data_dir)
    state.setdefault("materialized", {}).update({name: fingerprint(p) for name, p in paths.items()})
    state["unfinished"] = sorted(set(state.get("unfinished", [])) - set(paths))
    _write_mark(store)
    _write_state(layout.data_dir, state)
    total = sum(rows.values())
    online = store.config.online_store.type
    summary = (
        f"materialized {len(views)} views ({mode}, up to {end:%Y-%m-%d %H:%M:%S} UTC) into {online}: "
        f"{total} source rows in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} rows/s)"
    )
    return {
        "mode": mode,
        "end": end.isoformat(),
        "online_store": online,
        "views": sorted(paths),
        "source_rows": rows,
        "seconds": round(seconds, 3),
        "summary": summary,
    }


# ------------------------------------------------------------------------------- online


def service_join_keys(store: FeatureStore, service: FeatureService) -> list[str]:
    """The entity-row keys a service needs (after each projection's join-key map)."""
    keys: list[str] = []
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        for column in view.entity_columns:
            key = projection.join_key_map.get(column.name, column.name)
            if key not in keys:
                keys.append(key)
    return keys


def service_feature_names(service: FeatureService) -> list[str]:
    """Column names the service yields with full feature names (`<projection>__<feature>`)."""
    return [f"{p.name_to_use()}__{f.name}" for p in service.feature_view_projections for f in p.features]


def get_service(store: FeatureStore, name: str, data_dir: Path) -> FeatureService:
    """A registered feature service, or a UserError listing the ones there are."""
    try:
        return store.get_feature_service(name, allow_cache=False)
    except Exception:
        names = sorted(s.name for s in store.list_feature_services())
        raise UserError(
            f"no feature service {name!r} in {Path(data_dir).resolve()} "
            f"(have: {', '.join(names) or 'none'}); a service exists only when the jobs behind it "
            f"have run, then {_fix('apply', data_dir)}"
        ) from None


@dataclass
class OnlineLookup:
    """An online lookup's result, column-wise, with what could not be found."""

    columns: dict[str, list[Any]]
    feature_names: list[str]
    null_counts: dict[str, int]
    rows: int

    @property
    def rows_with_nulls(self) -> int:
        """Entity rows with at least one null feature (an unknown key, or a text never embedded)."""
        return sum(any(self.columns[f][i] is None for f in self.feature_names) for i in range(self.rows))

    def to_records(self) -> list[dict[str, Any]]:
        return [{k: v[i] for k, v in self.columns.items()} for i in range(self.rows)]


def normalize_entity_rows(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Entity rows as Feast takes them: every key present, strings, no nulls."""
    out = []
    for row in rows:
        missing = [k for k in keys if k not in row]
        if missing:
            raise UserError(f"entity row lacks {', '.join(missing)} (this service needs {', '.join(keys)})")
        out.append({k: MISSING_KEY if row[k] is None else str(row[k]) for k in keys})
    return out


class OnlineFeatures:
    """Online lookups of one service; opens and checks the store once, then serves many calls."""

    def __init__(self, data_dir: Path, service: str) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.store = open_store(self.data_dir)
        check_current(self.store, self.data_dir)
        if service.endswith(TRAINING_SUFFIX):
            raise UserError(
                f"{service!r} reads the offline leave-one-out view; use training_frame() for it, "
                f"and {service[: -len(TRAINING_SUFFIX)]!r} online"
            )
        self.service = get_service(self.store, service, self.data_dir)
        self.keys = service_join_keys(self.store, self.service)
        self.feature_names = service_feature_names(self.service)
        check_materialized(self.store, self.service, self.data_dir)

    def get(self, entity_rows: Sequence[Mapping[str, Any]]) -> OnlineLookup:
        """Features for these entity rows; unknown keys give nulls, counted per feature."""
        rows = normalize_entity_rows(entity_rows, self.keys)
        with online_store_errors(self.store):
            values = self.store.get_online_features(
                features=self.service, entity_rows=rows, full_feature_names=True
            ).to_dict()
        nulls = {name: sum(v is None for v in values[name]) for name in self.feature_names}
        return OnlineLookup(values, self.feature_names, nulls, len(rows))


def check_materialized(store: FeatureStore, service: FeatureService, data_dir: Path) -> None:
    """Refuse a service whose views were never materialised, or whose inputs changed since;
    probe the online store once so an unreachable Redis fails here, not mid-job."""
    state = _read_state(data_dir)
    for projection in service.feature_view_projections:
        view: FeatureView = store.get_feature_view(projection.name, allow_registry_cache=False)
        if view.name in state.get("unfinished", []):
            raise UserError(
                f"the last materialize of feature view {view.name} did not finish (killed, or the "
                "online store went away), so the store may be half-written: "
                f"run {_fix('materialize', data_dir)}"
            )
        if not view.materialization_intervals:
            raise UserError(
                f"feature view {view.name} is not materialised: run {_fix('materialize', data_dir)}"
            )
        if state.get("materialized", {}).get(view.name) != fingerprint(Path(view.batch_source.path)):
            raise UserError(
                f"the input of feature view {view.name} changed since it was materialised: "
                f"run {_fix('materialize', data_dir)}"
            )
    probe_online_store(store)
    _check_mark(store, data_dir)
    keys = service_join_keys(store, service)
    with online_store_errors(store):
        store.get_online_features(
            features=service, entity_rows=[dict.fromkeys(keys, MISSING_KEY)], full_feature_names=True
        )


# ------------------------------------------------------------------------------- offline


def historical_features(data_dir: Path, entity_df: pd.DataFrame, service: str) -> pd.DataFrame:
    """Feast's point-in-time join of `entity_df` (event_timestamp + the service's keys) with
    `service`: every input row, in order, plus `<projection>__<feature>` columns.

    Timestamps may be naive (read as UTC, as Feast does) or in any zone. Feast's file store does
    the join, one call per feature view the service reads. What it does not do is keep every
    entity row: it drops a row whose keys have feature rows only after its time (or older than
    the view's ttl), and collapses rows that share a view's keys and time (feast-dev/feast#6787).
    So each call gets the distinct (keys, time) pairs of its view, and the answers are mapped
    back onto every row; a row with no value at its time gets nulls, as a point-in-time join
    should give.
    """
    store = open_store(data_dir)
    check_current(store, data_dir)
    feature_service = get_service(store, service, data_dir)
    keys = service_join_keys(store, feature_service)
    missing = [c for c in [TIMESTAMP, *keys] if c not in entity_df.columns]
    if missing:
        raise UserError(f"the entity frame lacks {', '.join(missing)} (service {service} joins on {keys})")
    frame = entity_df.reset_index(drop=True)
    features: dict[str, Any] = {}
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
    data_dir: Path, service: str = CASCADE_FROZEN, splits: Sequence[str] | None = None
) -> pd.DataFrame:
    """Impressions joined point-in-time with a service's training twin: the leave-one-out CTR
    history (a training row never sees its own label) and the ad and query text embeddings.

    Columns: every impression column, then `<projection>__<feature>`, the same names an online
    lookup of `service` gives.
    """
    data_dir = Path(data_dir).resolve()
    twin = service if service.endswith(TRAINING_SUFFIX) else training_service_name(service)
    files = parquet_files(data_dir / IMPRESSIONS)
    if not files:
        raise UserError(f"{data_dir} has no impressions; run `nlpctr data prepare` into it")
    dataset = ds.dataset(files, format="parquet")
    where = pc.field("split").isin(list(splits)) if splits else None
    impressions = dataset.to_table(filter=where).to_pandas()
    return historical_features(data_dir, impressions, twin)


# ------------------------------------------------------------------------------- offline at scale

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
    `Layout.check_unique_keys` before we get here.
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
    """Where `write_training_shards` puts a service's training frame: `<split>/part-0.parquet`."""
    return Path(data_dir).resolve() / TRAINING / service


def write_training_shards(
    data_dir: Path,
    service: str = CASCADE_FROZEN,
    memory_limit: str = JOIN_MEMORY_LIMIT,
) -> Path:
    """`training_frame` for data that does not fit in memory: the same point-in-time join, run
    by DuckDB (an as-of join that spills to disk) from the service's Feast definitions, written
    as `DIR/training/<service>/<split>/part-0.parquet`, rows in impression_id order, row groups
    of SHARD_ROWS rows. Reuses the shards when the impressions and every source are unchanged.
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
    (staging / TRAINING_META).write_text(json.dumps({"identity": identity, "rows": rows}, indent=2) + "\n")
    retired = out.parent / f".{out.name}.old"
    shutil.rmtree(retired, ignore_errors=True)
    if out.exists():
        out.rename(retired)
    staging.rename(out)  # readers see the old shards or the new ones, never a mix
    shutil.rmtree(retired, ignore_errors=True)
    return out
