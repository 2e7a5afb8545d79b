"""Batch enrichment: impressions + online features, read the way serving reads them (Beam).

    nlpctr score-batch --data DIR [--service cascade_frozen] [--enrichment batched|per-element]
                       [--batch-size 256] [--splits test ...] [--out PATH]
                       [--run NAME [--runs-dir runs]] [beam options]

Each impression is enriched from the Feast online store with Beam's `Enrichment` transform, so a
batch job sees exactly the values a live model would. With `--run`, the run's trained model
(rebuilt from `RUNS/NAME/run.json`; a joint run's LM reads the row's texts) scores the enriched
rows in batches and a `p` column is added; the service defaults to the one the run trained on.
`per-element` is Beam's stock `FeastFeatureStoreEnrichmentHandler`: one `get_online_features` call
per row, each paying Feast's fixed per-call cost. `batched` (the
default) is the same handler with Beam's request batching switched on (`batch_elements_kwargs`),
one call per batch of rows: bench/bench_feast.py measures both.

Writes `DIR/enriched/<service>/part-*.parquet` (`DIR/scored/<run>/` with --run; or --out): the
impression columns plus `<projection>__<feature>` columns (and `p`), the names `training_frame()`
gives. Unknown keys come back null
and are counted per feature.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import apache_beam as beam
import pandas as pd
import pyarrow as pa
import redis.exceptions
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult
from apache_beam.transforms.enrichment import Enrichment, EnrichmentSourceHandler
from apache_beam.transforms.enrichment_handlers.feast_feature_store import FeastFeatureStoreEnrichmentHandler
from feast import FeatureStore

from nlpctr.errors import UserError
from nlpctr.features import render
from nlpctr.features import store as feature_store
from nlpctr.features.definitions import arrow_type
from nlpctr.features.job_outputs import parquet_files
from nlpctr.features.names import CASCADE_FROZEN
from nlpctr.layout import ENRICHED, IMPRESSIONS, SCORED, read_manifest
from nlpctr.models.runs import TrainedRun
from nlpctr.models.schema import SPLITS, impression_schema
from nlpctr.pipelines.loopback import run_to_completion
from nlpctr.pipelines.outputs import publish, staging_dir
from nlpctr.pipelines.ownership import claim_output_dir

METRICS_NAMESPACE = "nlpctr.score_batch"
ENRICHMENT_MODES = ("batched", "per-element")


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


class BatchedFeastEnrichmentHandler(FeastFeatureStoreEnrichmentHandler):
    """Beam's Feast handler with request batching: one `get_online_features` per batch.

    `RequestResponseIO` batches requests with `BatchElements` when a caller returns
    `batch_elements_kwargs`, then hands `__call__` a list and expects a list of
    (request, response) pairs back.
    """

    def __init__(self, *args: Any, batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def batch_elements_kwargs(self) -> Mapping[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": self.batch_size}

    def __call__(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(request, list):
            return super().__call__(request, *args, **kwargs)
        assert self.entity_row_fn is not None
        values = self.store.get_online_features(
            features=self.features,
            entity_rows=[self.entity_row_fn(r) for r in request],
            full_feature_names=self.full_feature_names,
        ).to_dict()
        return [(r, beam.Row(**{k: v[i] for k, v in values.items()})) for i, r in enumerate(request)]

    def get_cache_key(self, request: Any) -> str:
        # Cache on every key the service joins on, not only the first (the stock handler's choice).
        assert self.entity_row_fn is not None
        return "entity: " + "\x1f".join(f"{k}={v}" for k, v in self.entity_row_fn(request).items())


def enrichment_handler(
    config_path: Path, service: str, keys: Sequence[str], mode: str, batch_size: int
) -> FeastFeatureStoreEnrichmentHandler:
    """The Feast enrichment handler for `mode` (stock per-element, or batched)."""
    common: dict[str, Any] = {
        "feature_store_yaml_path": str(config_path),
        "feature_service_name": service,
        # Two projections of one embedding view (ad and query text) share feature names.
        "full_feature_names": True,
        "entity_row_fn": EntityRow(keys),
    }
    if mode == "per-element":
        return FeastFeatureStoreEnrichmentHandler(**common)
    if mode == "batched":
        return BatchedFeastEnrichmentHandler(**common, batch_size=batch_size)
    raise UserError(f"--enrichment must be one of {', '.join(ENRICHMENT_MODES)}, got {mode!r}")


class CountNulls(beam.DoFn):
    """Count rows and null features (Beam metrics, read back by the driver)."""

    def __init__(self, feature_names: Sequence[str]) -> None:
        self.feature_names = list(feature_names)

    def setup(self) -> None:
        self.rows = Metrics.counter(METRICS_NAMESPACE, "rows")
        self.rows_with_nulls = Metrics.counter(METRICS_NAMESPACE, "rows_with_nulls")
        self.nulls = {n: Metrics.counter(METRICS_NAMESPACE, f"null:{n}") for n in self.feature_names}

    def process(self, row: dict[str, Any]) -> Any:
        self.rows.inc()
        missing = [n for n in self.feature_names if row.get(n) is None]
        for name in missing:
            self.nulls[name].inc()
        if missing:
            self.rows_with_nulls.inc()
        yield row


class ScoreRows(beam.DoFn):
    """A trained run's click probability for each row of a batch (the model loads once per worker)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def setup(self) -> None:
        self.trained = TrainedRun.load(self.run_dir)

    def process(self, batch: list[dict[str, Any]]) -> Any:
        frame = pd.DataFrame(batch)
        data, p = self.trained.predict_frame(frame)
        by_id = {row["impression_id"]: row for row in batch}
        for impression_id, value in zip(data.impression_id, p, strict=True):
            yield {**by_id[impression_id], "p": float(value)}


def output_schema(context_columns: Sequence[str], service_fields: Sequence[tuple[str, Any]]) -> pa.Schema:
    """Impression schema plus one nullable column per served feature."""
    base = impression_schema(context_columns)
    return pa.schema([*base, *(pa.field(name, arrow_type(dtype)) for name, dtype in service_fields)])


class ReadImpressionRows(beam.PTransform):
    """Impressions parquet -> row dicts, only those of `splits` when given."""

    def __init__(self, file_pattern: str, splits: Sequence[str] | None = None) -> None:
        super().__init__()
        self.file_pattern = file_pattern
        self.splits = frozenset(splits) if splits else None

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.PCollection:
        rows = pbegin | "Read" >> beam.io.ReadFromParquet(self.file_pattern)
        if self.splits is None:
            return rows
        wanted = self.splits
        return rows | "KeepSplits" >> beam.Filter(lambda r: r["split"] in wanted)


class EnrichFromOnlineStore(beam.PTransform):
    """Row dicts -> the same rows plus one column per served feature, looked up in the online
    store by `handler` (Beam's `Enrichment`); rows and null features are counted (metrics)."""

    def __init__(self, handler: EnrichmentSourceHandler, feature_names: Sequence[str]) -> None:
        super().__init__()
        self.handler = handler
        self.feature_names = list(feature_names)

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (
            rows
            | "ToRows" >> beam.Map(lambda r: beam.Row(**r))
            | "Enrich" >> Enrichment(self.handler, join_fn=KeepFeatures(self.feature_names))
            | "ToDicts" >> beam.Map(lambda r: r._asdict())
            | "CountNulls" >> beam.ParDo(CountNulls(self.feature_names))
        )


class ScoreWithRun(beam.PTransform):
    """Enriched row dicts -> the same rows plus `p`, the trained run's click probability,
    scored in batches (one model per worker)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__()
        self.run_dir = run_dir

    def expand(self, rows: beam.PCollection) -> beam.PCollection:
        return (
            rows
            | "BatchRows" >> beam.BatchElements(min_batch_size=64, max_batch_size=512)
            | "Score" >> beam.ParDo(ScoreRows(self.run_dir))
        )


# What a lost or silent Redis raises inside the lookups (redis-py's ConnectionError covers a
# refused or dropped connection, TimeoutError a server that stopped answering).
ONLINE_STORE_FAULTS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)


class _DropOnlineStoreFaultLogs(logging.Filter):
    """Beam logs a failing step's exception with its traceback before it re-raises it; a lost
    online store is reported once, in one line, by `run_reporting_store_faults` instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ONLINE_STORE_FAULTS)


def run_reporting_store_faults(pipeline: beam.Pipeline, store: FeatureStore) -> PipelineResult:
    """Run the pipeline; an online store that goes away (or stops answering) while it runs is a
    UserError naming the store and the fix, never a traceback.

    In-process runners re-raise Redis's own exception (`online_store_errors` turns it into the
    UserError); runners that re-raise something else (a worker process's RuntimeError, Beam's
    request timeout) are checked against the store afterwards: when it does not answer a probe
    now, that is the reason given.
    """
    step_errors = logging.getLogger("apache_beam.runners.common")
    quiet = _DropOnlineStoreFaultLogs()
    step_errors.addFilter(quiet)
    try:
        with feature_store.online_store_errors(store):
            return run_to_completion(pipeline)
    except UserError:
        raise
    except Exception:
        feature_store.probe_online_store(store)  # raises the one-line UserError when it is gone
        raise
    finally:
        step_errors.removeFilter(quiet)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our flags; everything else goes to Beam's PipelineOptions."""
    parser = argparse.ArgumentParser(prog="nlpctr score-batch", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="a prepared dataset folder")
    parser.add_argument(
        "--service", default=None, help="feature service (default: the run's, else cascade_frozen)"
    )
    parser.add_argument("--enrichment", choices=ENRICHMENT_MODES, default="batched")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per online lookup (batched)")
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=None, help="only these splits")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default DIR/enriched/SERVICE)")
    parser.add_argument("--run", default=None, help="score with this trained run (RUNS/NAME)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    return parser.parse_known_args(argv)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """Enrich impressions from the online store; returns counts, timing and a `summary` line.

    `test_pipeline` (a `TestPipeline`) replaces the pipeline built from the Beam options, as in
    Beam's own examples. An online store lost mid-run is a UserError (one line), not a crash."""
    args, beam_args = parse_args(argv)
    data_dir: Path = args.data.resolve()
    run_dir = None
    if args.run is not None:
        run_dir = (args.runs_dir / args.run).resolve()
        spec_path = run_dir / "run.json"
        if not spec_path.is_file():
            raise UserError(f"{run_dir} is not a finished run (no run.json); train it with `nlpctr train`")
        trained_service = json.loads(spec_path.read_text())["service"]
        if args.service not in (None, trained_service):
            raise UserError(
                f"run {args.run} was trained on service {trained_service!r}, not {args.service!r}"
            )
        args.service = trained_service
    args.service = args.service or CASCADE_FROZEN
    # Before any work: --out is new, empty or an earlier score-batch output, holding no input.
    default_out = data_dir / SCORED / args.run if args.run else data_dir / ENRICHED / args.service
    inputs = [data_dir / IMPRESSIONS, *([run_dir] if run_dir is not None else [])]
    out = claim_output_dir(args.out or default_out, "score-batch", inputs=inputs)
    # Fail before the pipeline starts: not applied, stale, not materialised, Redis down.
    online = feature_store.OnlineFeatures(data_dir, args.service)
    if not parquet_files(data_dir / IMPRESSIONS):
        raise UserError(f"{data_dir} has no impressions; run `nlpctr data prepare` into it")
    manifest = read_manifest(data_dir)
    fields = [
        (f"{p.name_to_use()}__{f.name}", f.dtype)
        for p in online.service.feature_view_projections
        for f in p.features
    ]
    schema = output_schema(manifest.get("context_columns", []), fields)
    if run_dir is not None:
        schema = schema.append(pa.field("p", pa.float64()))
    handler = enrichment_handler(
        render.config_path(data_dir), args.service, online.keys, args.enrichment, args.batch_size
    )
    staging = staging_dir(out)
    started = time.perf_counter()
    try:
        pipeline = (
            test_pipeline if test_pipeline is not None else beam.Pipeline(options=PipelineOptions(beam_args))
        )
        rows = pipeline | "ReadImpressions" >> ReadImpressionRows(
            str(data_dir / IMPRESSIONS / "*.parquet"), args.splits
        )
        rows = rows | "Enrich" >> EnrichFromOnlineStore(handler, online.feature_names)
        if run_dir is not None:
            rows = rows | "Score" >> ScoreWithRun(run_dir)
        _ = rows | "Write" >> beam.io.WriteToParquet(
            str(staging / "part"), schema, file_name_suffix=".parquet"
        )
        result = run_reporting_store_faults(pipeline, online.store)
        wall = time.perf_counter() - started
        counters = {
            c.key.metric.name: c.committed
            for c in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
        }
        publish(staging, out, "score-batch")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    rows = int(counters.get("rows", 0))
    nulls = {n: int(counters.get(f"null:{n}", 0)) for n in online.feature_names}
    with_nulls = int(counters.get("rows_with_nulls", 0))
    scored = f", scored by run {args.run}" if args.run else ""
    summary = (
        f"score-batch {args.service} ({args.enrichment}{scored}): {rows} rows enriched in {wall:.1f} s "
        f"({rows / max(wall, 1e-9):.0f} rows/s); {with_nulls} row(s) with a null feature; -> {out}"
    )
    return {
        "service": args.service,
        "run": args.run,
        "enrichment": args.enrichment,
        "batch_size": args.batch_size if args.enrichment == "batched" else 1,
        "rows": rows,
        "rows_with_nulls": with_nulls,
        "null_counts": nulls,
        "wall_seconds": round(wall, 3),
        "rows_per_second": rows / max(wall, 1e-9),
        "out": str(out),
        "summary": summary,
    }
