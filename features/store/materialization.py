"""Load a dataset's online feature views from their parquet sources into SQLite or Redis."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from feast import FeatureStore, FeatureView

from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError
from nlpctr.features.job_outputs import fingerprint
from nlpctr.features.names import TIMESTAMP
from nlpctr.features.store.connection import online_store_errors, probe_online_store, write_materialized_mark
from nlpctr.features.store.repo import check_current, check_duckdb_path, open_store, spark_errors
from nlpctr.features.store.state import fix_command, read_state, state_path, write_state
from nlpctr.layout import require_writable
from nlpctr.prepared import parquet_files


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


@contextlib.contextmanager
def _overwriting(store: FeatureStore) -> Iterator[None]:
    """Let Redis writes replace a stored value whose event time is the same as the new row's.

    Feast's Redis store skips a row whose event time is not newer than the stored one, so a
    value corrected at the same time (ctr-stats re-run with another prior, a view re-embedded
    by another encoder under the same slug) would stay stale while the state file calls it
    materialised. Its `skip_dedup` writes every row instead, which a full run may: Feast reads
    the latest row per key up to `end`, so each key is written once, from the source of truth.
    SQLite needs nothing: its store always upserts.
    """
    config = store.config.online_store
    if config.type != "redis":
        yield
        return
    before = config.skip_dedup
    config.skip_dedup = True
    try:
        yield
    finally:
        config.skip_dedup = before


def _mark_unfinished(data_dir: Path, paths: dict[str, Path]) -> None:
    """Until the end, these views count as half-written: Feast records each view as materialised
    as soon as its own rows are in, so a run killed (or a Redis lost) midway would otherwise
    leave a store that says "materialised" beside a view that is only partly there."""
    state = read_state(data_dir)
    for name in paths:
        state.setdefault("materialized", {}).pop(name, None)
    state["unfinished"] = sorted(set(state.get("unfinished", [])) | set(paths))
    write_state(data_dir, state)


def _mark_finished(store: FeatureStore, data_dir: Path, paths: dict[str, Path]) -> None:
    """The views are whole: record each source's fingerprint, as the state file and the store."""
    state = read_state(data_dir)
    state.setdefault("materialized", {}).update({name: fingerprint(p) for name, p in paths.items()})
    state["unfinished"] = sorted(set(state.get("unfinished", [])) - set(paths))
    write_materialized_mark(store)
    write_state(data_dir, state)


def _load(
    store: FeatureStore,
    views: list[FeatureView],
    window: tuple[datetime | None, datetime],
    first: datetime,
    incremental: bool,
) -> str:
    """Feast's materialisation of `views` up to the window's end: from the window's start when
    given, else from each view's last end (`incremental`; a view never materialised from
    `first`), else from `first`, the sources' earliest event time. Returns the mode: window,
    incremental or full."""
    start, end = window
    with online_store_errors(store), spark_errors(store):
        if start is not None:
            store.materialize(_utc(start), end, feature_views=[v.name for v in views])
            return "window"
        if incremental:
            fresh = [v.name for v in views if not v.materialization_intervals]
            seen = [v.name for v in views if v.materialization_intervals]
            if fresh:
                store.materialize(first, end, feature_views=fresh)
            if seen:
                store.materialize_incremental(end, feature_views=seen)
            return "incremental"
        with _overwriting(store):
            store.materialize(first, end, feature_views=[v.name for v in views])
        return "full"


def materialize(
    data_dir: Path,
    start: datetime | None = None,
    end: datetime | None = None,
    incremental: bool = False,
    views: Sequence[str] | None = None,
) -> JsonObject:
    """Load the online views of DIR into the online store. A full run (the default) loads every
    source from its earliest event time and replaces every key's value, even one stored at the
    same event time, since a re-run job's corrected rows keep data-time timestamps
    (`_overwriting`); a view never materialised gets the full range even when `incremental`
    (Feast would start a ttl=0 view at "now - 1 year").

    Args:
        data_dir: a prepared dataset folder whose store has been applied.
        start, end: an explicit window (default: the full range, up to now or the latest event).
        incremental: load from each view's last materialised end.
        views: the names of the online views to load; None for all of them.

    Returns:
        `mode` (full/incremental/window), `end`, `online_store`, `views`, `source_rows`, `seconds`,
        `summary`.

    Raises:
        UserError: no store or an out-of-date one (`open_store`, `check_current`), duplicate keys
            in a source, no online views or no rows in them, `start` not before `end`, an
            unwritable store folder or an unreachable online store.
    """
    store = open_store(data_dir)
    check_duckdb_path(data_dir, store.config.offline_store.type)
    layout = check_current(store, data_dir)
    layout.check_unique_keys()
    only = set(views) if views is not None else None
    listed = store.list_feature_views(allow_cache=False)
    views = [v for v in listed if v.online and (only is None or v.name in only)]
    if not views:
        raise UserError(f"no online feature views in {layout.data_dir}; run {fix_command('apply', data_dir)}")
    paths = {v.name: Path(v.batch_source.path) for v in views}
    span = _timestamp_range(list(paths.values()))
    if span is None:
        raise UserError(
            f"the online views of {layout.data_dir} have no rows; re-run the jobs that write them"
        )
    now = datetime.now(UTC)
    end = _utc(end) if end else max(now, span[1] + timedelta(seconds=1))
    if start is not None and _utc(start) >= end:
        # Refused before the views are marked unfinished: nothing was loaded, so nothing is stale.
        raise UserError(
            f"--start {_utc(start):%Y-%m-%d %H:%M:%S} is not before --end {end:%Y-%m-%d %H:%M:%S} (UTC); "
            "nothing was changed; give a window whose start comes first"
        )
    require_writable(
        state_path(layout.data_dir).parent,
        "materialize writes the store's state there (and SQLite's online store); make it writable",
    )
    probe_online_store(store)
    _mark_unfinished(layout.data_dir, paths)
    started = datetime.now(UTC)
    mode = _load(store, views, (start, end), span[0], incremental)
    seconds = (datetime.now(UTC) - started).total_seconds()
    rows = {
        name: sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(p)) for name, p in paths.items()
    }
    _mark_finished(store, layout.data_dir, paths)
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
