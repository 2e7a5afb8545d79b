"""The Beam transforms of `nlpctr score-batch` (pipelines/score_batch.py builds the job from them).

Impressions are read as Arrow batches (or rows, for Beam's stock per-element `Enrichment`),
enriched from the Feast online store, their null features counted in Beam metrics, and scored
by a trained run when one is asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.transforms.enrichment import Enrichment, EnrichmentSourceHandler
from apache_beam.transforms.enrichment_handlers.feast_feature_store import FeastFeatureStoreEnrichmentHandler

from nlpctr.features import store as feature_store
from nlpctr.models.runs import TrainedRun
from nlpctr.models.schema import impression_schema
from nlpctr.pipelines.devices import worker_placement

METRICS_NAMESPACE = "nlpctr.score_batch"


class ArrowTableCoder(beam.coders.Coder):
    """Arrow batches between the job's steps: Arrow's IPC stream when a runner moves one, and
    the table's own byte count when Beam only weighs it. Beam's default coder pickles each
    sampled element to weigh it: the first few batches of every step, ~40 MB each once enriched,
    were pickled only to be measured (~10% of the job's CPU time, bench/results/enrichment.md)."""

    def encode(self, value: pa.Table) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, value.schema) as writer:
            writer.write_table(value)
        return sink.getvalue().to_pybytes()

    def decode(self, encoded: bytes) -> pa.Table:
        return pa.ipc.open_stream(encoded).read_all()

    def estimate_size(self, value: pa.Table) -> int:
        return value.nbytes

    def is_deterministic(self) -> bool:
        return False

    def to_type_hint(self) -> type:
        return pa.Table


# Every PCollection typed `pa.Table` (`with_output_types`) gets this coder.
beam.coders.registry.register_coder(pa.Table, ArrowTableCoder)


class EntityRow:
    """Request row -> Feast entity row for the service's keys (a picklable callable).

    Null keys become a key no entity has: Feast cannot take a null join key.
    """

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)

    def __call__(self, row: beam.Row) -> dict[str, str]:
        values = row._asdict()
        return {k: feature_store.MISSING_KEY if values.get(k) is None else str(values[k]) for k in self.keys}


class KeepFeatures:
    """Enrichment join: the request row plus the feature columns of the response.

    Beam's default cross join would also compare the entity keys Feast echoes back, and log a
    warning for every row whose null key we sent as the empty id.
    """

    def __init__(self, feature_names: Sequence[str]) -> None:
        self.feature_names = list(feature_names)

    def __call__(self, left: Mapping[str, Any], right: Mapping[str, Any]) -> beam.Row:
        return beam.Row(**{**left, **{name: right.get(name) for name in self.feature_names}})


def per_element_handler(
    config_path: Path, service: str, keys: Sequence[str]
) -> FeastFeatureStoreEnrichmentHandler:
    """Beam's stock Feast handler: one `get_online_features` call per row."""
    return FeastFeatureStoreEnrichmentHandler(
        feature_store_yaml_path=str(config_path),
        feature_service_name=service,
        # Two projections of one embedding view (ad and query text) share feature names.
        full_feature_names=True,
        entity_row_fn=EntityRow(keys),
    )


class EnrichBatches(beam.DoFn):
    """Arrow batches of impressions -> the same rows plus the served features, `batch_size` rows
    per lookup (one `feature_store.OnlineFeatureLookup` per worker), one output batch each."""

    def __init__(self, lookup: feature_store.OnlineFeatureLookup, batch_size: int) -> None:
        self.lookup = lookup
        self.batch_size = batch_size

    def setup(self) -> None:
        self.lookup.open()

    def process(self, table: pa.Table) -> Any:
        for start in range(0, table.num_rows, self.batch_size):
            yield self.lookup(table.slice(start, self.batch_size))


class RowsToBatches(beam.PTransform):
    """Row dicts -> Arrow batches of `schema` (the per-element path joins the batched one here)."""

    def __init__(self, schema: pa.Schema) -> None:
        super().__init__()
        self.schema = schema

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        schema = self.schema
        return (
            rows
            | "Batch" >> beam.BatchElements(min_batch_size=256, max_batch_size=4096)
            | "ToTables"
            >> beam.Map(lambda batch: pa.Table.from_pylist(batch, schema=schema)).with_output_types(pa.Table)
        )


class EnrichFromOnlineStore(beam.PTransform):
    """Row dicts -> the same rows plus one column per served feature, looked up one row at a time
    in the online store by Beam's `Enrichment` with its stock Feast handler (the reference the
    batched path is measured against); Arrow batches of `schema` out."""

    def __init__(
        self, handler: EnrichmentSourceHandler, schema: pa.Schema, feature_names: Sequence[str]
    ) -> None:
        super().__init__()
        self.handler = handler
        self.schema = schema
        self.feature_names = list(feature_names)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (
            rows
            | "ToRows" >> beam.Map(lambda r: beam.Row(**r))
            | "Enrich" >> Enrichment(self.handler, join_fn=KeepFeatures(self.feature_names))
            | "ToDicts" >> beam.Map(lambda r: r._asdict())
            | "ToBatches" >> RowsToBatches(self.schema)
        )


class CountNulls(beam.DoFn):
    """Count rows and null features of Arrow batches (Beam metrics, read back by the driver)."""

    def __init__(self, feature_names: Sequence[str]) -> None:
        self.feature_names = list(feature_names)

    def setup(self) -> None:
        self.rows = Metrics.counter(METRICS_NAMESPACE, "rows")
        self.rows_with_nulls = Metrics.counter(METRICS_NAMESPACE, "rows_with_nulls")
        self.nulls = {n: Metrics.counter(METRICS_NAMESPACE, f"null:{n}") for n in self.feature_names}

    def process(self, table: pa.Table) -> Any:
        self.rows.inc(table.num_rows)
        any_null = pa.array([False] * table.num_rows)
        for name in self.feature_names:
            is_null = table[name].is_null()
            self.nulls[name].inc(pc.sum(is_null.cast(pa.int64())).as_py() or 0)
            any_null = pc.or_(any_null, is_null)
        self.rows_with_nulls.inc(pc.sum(any_null.cast(pa.int64())).as_py() or 0)
        yield table


class ScoreBatches(beam.DoFn):
    """A trained run's click probability `p` for each row of an Arrow batch (the model loads once
    per worker, on `device`); scores are joined back by impression id, whatever order the model
    returns."""

    def __init__(self, run_dir: Path, device: str = "auto") -> None:
        self.run_dir = Path(run_dir)
        self.device = device

    def setup(self) -> None:
        self.trained = TrainedRun.load(self.run_dir, worker_placement(self.device))

    def process(self, table: pa.Table) -> Any:
        data, p = self.trained.predict_frame(table.to_pandas())
        by_id = pd.Series(np.asarray(p, dtype=np.float64), index=pd.Index(data.impression_id))
        scores = by_id.reindex(table["impression_id"].to_pandas())
        if scores.isna().any():
            raise RuntimeError("the run returned no score for some rows")  # a defect, not bad input
        yield table.append_column(pa.field("p", pa.float64()), pa.array(scores.to_numpy(), pa.float64()))


def output_schema(
    context_columns: Sequence[str], service_fields: Sequence[pa.Field], numeric_columns: Sequence[str] = ()
) -> pa.Schema:
    """Impression schema plus one nullable column per served feature."""
    return pa.schema([*impression_schema(context_columns, numeric_columns), *service_fields])


def _keep_splits(table: pa.Table, splits: frozenset[str] | None) -> pa.Table:
    if splits is None:
        return table
    return table.filter(pc.is_in(table["split"], value_set=pa.array(sorted(splits), pa.string())))


class ReadImpressionBatches(beam.PTransform):
    """Impressions parquet -> Arrow batches (as the files' row groups come), only rows of
    `splits` when given."""

    def __init__(self, file_pattern: str, splits: Sequence[str] | None = None) -> None:
        super().__init__()
        self.file_pattern = file_pattern
        self.splits = frozenset(splits) if splits else None

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        splits = self.splits
        return (
            pbegin
            | "Read" >> beam.io.ReadFromParquetBatched(self.file_pattern).with_output_types(pa.Table)
            | "KeepSplits" >> beam.Map(_keep_splits, splits).with_output_types(pa.Table)
            | "DropEmpty" >> beam.Filter(lambda t: t.num_rows > 0).with_output_types(pa.Table)
        )


class ReadImpressionRows(beam.PTransform):
    """Impressions parquet -> row dicts, only those of `splits` when given."""

    def __init__(self, file_pattern: str, splits: Sequence[str] | None = None) -> None:
        super().__init__()
        self.file_pattern = file_pattern
        self.splits = splits

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        return (
            pbegin
            | "ReadBatches" >> ReadImpressionBatches(self.file_pattern, self.splits)
            | "ToRows" >> beam.FlatMap(lambda t: t.to_pylist())
        )


class ScoreWithRun(beam.PTransform):
    """Enriched Arrow batches -> the same rows plus `p`, the trained run's click probability."""

    def __init__(self, run_dir: Path, device: str = "auto") -> None:
        super().__init__()
        self.run_dir = run_dir
        self.device = device

    def expand(self, batches: beam.PCollection) -> beam.PCollection:
        return batches | "Score" >> beam.ParDo(ScoreBatches(self.run_dir, self.device)).with_output_types(
            pa.Table
        )
