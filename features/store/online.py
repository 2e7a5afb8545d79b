"""Online lookups of a feature service, with what could not be found counted per feature: row
dicts (`OnlineFeatures`) or whole Arrow batches (`OnlineFeatureLookup`, what batch jobs use).

A row dict may carry a text (`ad_text`, `query_text`) instead of its id: a text the store has
no vector for gets one computed at lookup time by the encoder behind the view
(`request_time.py`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from feast import FeatureService, FeatureStore, FeatureView
from feast.errors import FeatureServiceNotFoundException
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type

from nlpctr.errors import UserError
from nlpctr.features.definitions import arrow_type
from nlpctr.features.job_outputs import fingerprint
from nlpctr.features.names import TRAINING_SUFFIX
from nlpctr.features.store.connection import check_materialized_mark, online_store_errors, probe_online_store
from nlpctr.features.store.repo import check_current, open_store
from nlpctr.features.store.request_time import (
    RequestTimeVectors,
    ids_from_texts,
    text_fields,
    text_projections,
)
from nlpctr.features.store.state import fix_command, read_state

# Feast's online store cannot take a null join key (it sorts keys by value); an impression with
# no query text is looked up under this id, which no text has, and comes back null.
MISSING_KEY = ""
# Distinct keys per `get_online_features` call of a batch lookup: Feast's cost per key grows past
# a few hundred keys a call (bench/bench_feast.py), and a batch's distinct keys may be thousands.
CALL_KEYS = 256


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


def service_fields(service: FeatureService) -> list[pa.Field]:
    """The service's columns (`service_feature_names`) typed as Arrow fields."""
    return [
        pa.field(f"{p.name_to_use()}__{f.name}", arrow_type(f.dtype))
        for p in service.feature_view_projections
        for f in p.features
    ]


def get_service(store: FeatureStore, name: str, data_dir: Path) -> FeatureService:
    """A registered feature service, or a UserError listing the ones there are."""
    try:
        return store.get_feature_service(name, allow_cache=False)
    except FeatureServiceNotFoundException:
        names = sorted(s.name for s in store.list_feature_services())
        raise UserError(
            f"no feature service {name!r} in {Path(data_dir).resolve()} "
            f"(have: {', '.join(names) or 'none'}); a service exists only when the jobs behind it "
            f"have run, then {fix_command('apply', data_dir)}"
        ) from None


@dataclass
class OnlineLookup:
    """An online lookup's result, column-wise, with what could not be found."""

    columns: dict[str, list[Any]]
    feature_names: list[str]
    null_counts: dict[str, int]
    rows: int
    computed: dict[str, int] = field(default_factory=dict)  # vectors computed at lookup, per feature

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
        # Request fields that may carry a text instead of its id (`ad_text`, `query_text`).
        self.text_fields = text_fields(self.keys)
        self.request_time = RequestTimeVectors(self.data_dir, text_projections(self.store, self.service))
        check_materialized(self.store, self.service, self.data_dir)

    def get(self, entity_rows: Sequence[Mapping[str, Any]]) -> OnlineLookup:
        """Features for these entity rows; unknown keys give nulls, counted per feature.

        A row may give a text (`ad_text`, `query_text`) for its id: the id is derived, and a
        text the store has no vector for gets one computed now by the view's encoder
        (`OnlineLookup.computed` counts them; they are not nulls).

        Args:
            entity_rows: each a mapping of the service's keys (`keys`), or texts (`text_fields`).

        Returns:
            The features column-wise, with null and computed counts per feature.

        Raises:
            UserError: a key missing, a text that disagrees with its id, an encoder that no
                longer gives the store's encoder version, an unreachable online store.
        """
        with_ids = ids_from_texts(entity_rows, self.keys)
        rows = normalize_entity_rows(with_ids, self.keys)
        with online_store_errors(self.store):
            values = self.store.get_online_features(
                features=self.service, entity_rows=rows, full_feature_names=True
            ).to_dict()
        computed = self.request_time.fill(values, with_ids)
        nulls = {name: sum(v is None for v in values[name]) for name in self.feature_names}
        return OnlineLookup(values, self.feature_names, nulls, len(rows), computed)


def check_materialized(store: FeatureStore, service: FeatureService, data_dir: Path) -> None:
    """Refuse a service whose views were never materialised, or whose inputs changed since;
    probe the online store once so an unreachable Redis fails here, not mid-job."""
    state = read_state(data_dir)
    for projection in service.feature_view_projections:
        view: FeatureView = store.get_feature_view(projection.name, allow_registry_cache=False)
        if view.name in state.get("unfinished", []):
            raise UserError(
                f"the last materialize of feature view {view.name} did not finish (killed, or the "
                "online store went away), so the store may be half-written: "
                f"run {fix_command('materialize', data_dir)}"
            )
        if not view.materialization_intervals:
            raise UserError(
                f"feature view {view.name} is not materialised: run {fix_command('materialize', data_dir)}"
            )
        if state.get("materialized", {}).get(view.name) != fingerprint(Path(view.batch_source.path)):
            raise UserError(
                f"the input of feature view {view.name} changed since it was materialised: "
                f"run {fix_command('materialize', data_dir)}"
            )
    probe_online_store(store)
    check_materialized_mark(store, data_dir)
    keys = service_join_keys(store, service)
    with online_store_errors(store):
        store.get_online_features(
            features=service, entity_rows=[dict.fromkeys(keys, MISSING_KEY)], full_feature_names=True
        )


@dataclass(frozen=True)
class ViewRead:
    """What one feature view of a service serves: its projections' request columns and names."""

    view: str
    join_keys: tuple[str, ...]  # the view's own entity keys
    features: tuple[str, ...]  # every feature any projection of the view serves
    # per projection: (its name, the request column each join key is read from, its features)
    projections: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]


def view_reads(store: FeatureStore, service: FeatureService) -> list[ViewRead]:
    """The service's projections grouped by the view they read (an embedding view serves the ad
    and the query text under two names)."""
    grouped: dict[str, list[Any]] = {}
    for projection in service.feature_view_projections:
        grouped.setdefault(projection.name, []).append(projection)
    reads = []
    for name, projections in grouped.items():
        join_keys = tuple(c.name for c in store.get_feature_view(name).entity_columns)
        reads.append(
            ViewRead(
                view=name,
                join_keys=join_keys,
                features=tuple(dict.fromkeys(f.name for p in projections for f in p.features)),
                projections=tuple(
                    (
                        p.name_to_use(),
                        tuple(p.join_key_map.get(k, k) for k in join_keys),
                        tuple(f.name for f in p.features),
                    )
                    for p in projections
                ),
            )
        )
    return reads


def _positions(keys: pa.Table, distinct: pa.Table) -> pa.Array:
    """For each row of `keys`, the index of the equal row of `distinct`."""
    if keys.num_columns == 1:
        return pc.index_in(keys.column(0), value_set=distinct.column(0))
    numbered = distinct.append_column("__distinct", pa.array(range(distinct.num_rows), pa.int64()))
    rows = keys.append_column("__row", pa.array(range(keys.num_rows), pa.int64()))
    joined = rows.join(numbered, keys.column_names, use_threads=False).sort_by("__row")
    return joined["__distinct"].combine_chunks()


class OnlineFeatureLookup:
    """Online features for a whole Arrow batch of impressions: the batch plus one typed column per
    served feature (null where a key is unknown), as the service would serve them row by row.

    Feast's cost is per entity row it returns, so each view of the service is read once per
    batch, for the distinct keys the batch holds (e.g. an ad's text repeated over its
    impressions, or the same embedding view read for the query and the ad text), with Feast's
    own `get_online_features`, at most `call_keys` keys a call (its cost per key grows with the
    call's size: bench/bench_feast.py); the projections' names and join-key maps are applied here.
    """

    def __init__(self, config_path: Path, service: str, call_keys: int = CALL_KEYS) -> None:
        self.config_path = Path(config_path)
        self.service_name = service
        self.call_keys = call_keys
        self.store: FeatureStore | None = None
        self.keys: list[str] = []
        self.fields: list[pa.Field] = []
        self.reads: list[ViewRead] = []

    def open(self) -> None:
        self.store = FeatureStore(fs_yaml_file=self.config_path)
        service = self.store.get_feature_service(self.service_name)
        self.keys = service_join_keys(self.store, service)
        self.fields = service_fields(service)
        self.reads = view_reads(self.store, service)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch with the service's features appended (the store is opened on first use).

        Args:
            batch: impressions holding the service's join-key columns.

        Returns:
            `batch` plus one `<projection>__<feature>` column per served feature, null where
            a key is unknown.

        Raises:
            Exception: Feast's own, unchanged (an unknown service, an unreachable online store): the
            batch job reports them (`score_batch.run_reporting_store_faults`).
        """
        if self.store is None:
            self.open()
        requested = {k: pc.fill_null(pc.cast(batch[k], pa.string()), MISSING_KEY) for k in self.keys}
        types = {field.name: field.type for field in self.fields}
        for read in self.reads:
            asked = [
                pa.table(
                    {key: requested[column] for key, column in zip(read.join_keys, columns, strict=True)}
                )
                for _, columns, _ in read.projections
            ]
            distinct = pa.concat_tables(asked).group_by(list(read.join_keys), use_threads=False).aggregate([])
            kinds = {f: types[f"{name}__{f}"] for name, _, features in read.projections for f in features}
            served = self._read_view(read, distinct, kinds)  # each feature of the view converted once
            for (name, _, features), keys in zip(read.projections, asked, strict=True):
                index = _positions(keys, distinct)
                for feature in features:
                    column = f"{name}__{feature}"
                    batch = batch.append_column(
                        pa.field(column, types[column]), take_rows(served[feature], index)
                    )
        return batch.select([*batch.column_names[: -len(self.fields)], *types]) if self.fields else batch

    def _read_view(
        self, read: ViewRead, distinct: pa.Table, kinds: dict[str, pa.DataType]
    ) -> dict[str, pa.Array]:
        """Each feature of one view for the `distinct` keys, in their order, `call_keys` a call."""
        assert self.store is not None
        names = [f"{read.view}__{f}" for f in read.features]
        values: dict[str, list[ValueProto]] = {name: [] for name in names}
        for start in range(0, distinct.num_rows, self.call_keys):
            chunk = distinct.slice(start, self.call_keys)
            response = self.store.get_online_features(
                features=[f"{read.view}:{f}" for f in read.features],
                entity_rows={k: chunk[k].to_pylist() for k in read.join_keys},
                full_feature_names=True,
            ).proto
            # The response's own protos, not `to_dict()`: that converts the echoed join keys too,
            # and every float of a vector to a Python float that Arrow then converts back.
            for name, vector in zip(response.metadata.feature_names.val, response.results, strict=True):
                if name in values:
                    values[name].extend(vector.values)
        return {f: arrow_column(values[name], kinds[f]) for f, name in zip(read.features, names, strict=True)}


# Value kinds whose Python value is the field itself (what Feast's `to_dict()` returns for them).
SCALAR_KINDS = frozenset({"double_val", "float_val", "int64_val", "int32_val", "string_val", "bool_val"})
# Arrow value types filled from a list kind whose values are fixed-width on the wire (protobuf
# packs repeated scalars): the kind, and the values' little-endian dtype.
PACKED_LISTS: dict[pa.DataType, tuple[str, str]] = {
    pa.float32(): ("float_list_val", "<f4"),
    pa.float64(): ("double_list_val", "<f8"),
}


def arrow_column(values: Sequence[ValueProto], kind: pa.DataType) -> pa.Array:
    """Feast response values as one Arrow array of `kind`, equal to `pa.array(<to_dict()'s
    list>, kind)`: lists of floats straight from their packed bytes, other kinds through the
    Python value `to_dict()` gives."""
    if pa.types.is_list(kind):
        packed = packed_lists(values, kind)
        if packed is not None:
            return packed
    return pa.array([python_value(v) for v in values], kind)


def python_value(value: ValueProto) -> Any:
    """The Python value Feast's `to_dict()` gives for one response value."""
    which = value.WhichOneof("val")
    if which is None:
        return None
    return getattr(value, which) if which in SCALAR_KINDS else feast_value_type_to_python_type(value)


def packed_lists(values: Sequence[ValueProto], kind: pa.ListType) -> pa.Array | None:
    """A list array of `kind` read from each value's packed wire bytes, or None when a value is
    not a packed list of `kind`'s value type (the caller converts those through Python)."""
    if kind.value_type not in PACKED_LISTS:
        return None
    expected, dtype = PACKED_LISTS[kind.value_type]
    width = np.dtype(dtype).itemsize
    bodies: list[bytes] = []
    lengths = np.zeros(len(values) + 1, np.int32)
    nulls = np.zeros(len(values), np.bool_)
    for i, value in enumerate(values):
        which = value.WhichOneof("val")
        if which is None:
            nulls[i] = True
            continue
        if which != expected:
            return None
        items = getattr(value, which)
        wire, size = items.SerializeToString(), width * len(items.val)
        if size and wire[:-size] != packed_header(size):
            return None
        bodies.append(wire[len(wire) - size :])
        lengths[i + 1] = len(items.val)
    flat = pa.array(np.frombuffer(b"".join(bodies), dtype), kind.value_type)
    offsets = pa.array(np.cumsum(lengths, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, flat, type=kind, mask=pa.array(nulls) if nulls.any() else None)


@functools.cache
def packed_header(size: int) -> bytes:
    """A packed repeated field 1 of `size` bytes: its tag (field 1, length-delimited), then the
    size as a varint."""
    varint = bytearray()
    while size > 0x7F:
        varint.append(size & 0x7F | 0x80)
        size >>= 7
    return b"\x0a" + bytes(varint) + bytes([size])


def take_rows(array: pa.Array, index: pa.Array) -> pa.Array:
    """`array.take(index)`. A list array whose lists all have one length is taken as a fixed-size
    list, ~10x faster: Arrow takes variable lists one at a time."""
    if pa.types.is_list(array.type) and len(array):
        bounds = pc.min_max(pc.list_value_length(array))
        width = bounds["min"].as_py()
        if width is not None and width == bounds["max"].as_py():
            fixed = pa.list_(array.type.value_field, width)
            return array.cast(fixed).take(index).cast(array.type)
    return array.take(index)
