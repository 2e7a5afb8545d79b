"""Batch enrichment: impressions + online features, read the way serving reads them (Beam).

    nlpctr score-batch --data DIR [--service cascade_frozen] [--enrichment batched|per-element]
                       [--run NAME [--runs-dir runs] [--device auto|cpu|cuda[:N]]] [beam options]

Writes `DIR/enriched/<service>/part-*.parquet` (`DIR/scored/<run>/` with --run, or --out): the
impression columns, `<projection>__<feature>` columns and, with --run, `p`. The two enrichment
modes and model loading: docs/DESIGN.md, "Modules in detail", score_batch.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
import pyarrow as pa
import redis.exceptions
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult
from feast import FeatureStore

from nlpctr import prepared
from nlpctr.errors import UserError
from nlpctr.features import store as feature_store
from nlpctr.features import store_config
from nlpctr.features.names import CASCADE_FROZEN
from nlpctr.layout import ENRICHED, IMPRESSIONS, SCORED, DatasetIdentity, Manifest, RunLayout, read_manifest
from nlpctr.models.checkpoints import load_checkpoint
from nlpctr.models.schema import SPLITS
from nlpctr.pipelines.devices import launch_device
from nlpctr.pipelines.loopback import run_to_completion
from nlpctr.pipelines.outputs import staged_output
from nlpctr.pipelines.ownership import claim_output_dir
from nlpctr.pipelines.score_transforms import (
    METRICS_NAMESPACE,
    CountNulls,
    EnrichBatches,
    EnrichFromOnlineStore,
    ReadImpressionBatches,
    ReadImpressionRows,
    ScoreWithRun,
    output_schema,
    per_element_handler,
)
from nlpctr.prepared import parquet_files

ENRICHMENT_MODES = ("batched", "per-element")
JOB = "score-batch"
# Rows enriched together (`--batch-size`): each distinct key of the batch is read once (the more
# rows, the fewer keys a row: bench/bench_feast.py), and a batch is one row group of the output;
# 32,768 rows with a 384-d vector are ~60 MB in memory.
BATCH_ROWS = 32768


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
    parser.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_ROWS,
        help="rows enriched together (batched; each key read once)",
    )
    parser.add_argument("--splits", nargs="+", choices=SPLITS, default=None, help="only these splits")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default DIR/enriched/SERVICE)")
    parser.add_argument("--run", default=None, help="score with this trained run (RUNS/NAME)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument(
        "--allow-other-dataset",
        action="store_true",
        help="score with a run trained on another dataset (its IDs and history need not mean anything here)",
    )
    parser.add_argument(
        "--device", default="auto", help="with --run: auto (a GPU when there is one), cpu, cuda or cuda:N"
    )
    return parser.parse_known_args(argv)


@dataclass(frozen=True)
class ScoreBatchRequest:
    """One `nlpctr score-batch` run: which rows, enriched from which service, scored by which run.

    Raises:
        UserError: a batch size below 1, or an unknown enrichment.
    """

    data: Path  # a prepared dataset folder, its store applied and materialised
    service: str | None = None  # None: the run's, else cascade_frozen
    enrichment: str = "batched"  # or per-element (Beam's stock Enrichment)
    batch_size: int = BATCH_ROWS  # rows per online lookup (batched), as the CLI's default
    splits: tuple[str, ...] | None = None  # only these splits
    out: Path | None = None  # None: DIR/enriched/SERVICE (DIR/scored/RUN with a run)
    run: str | None = None  # score with this trained run (runs_dir/NAME)
    runs_dir: Path = Path("runs")
    allow_other_dataset: bool = False  # a run trained on another dataset scores anyway
    device: str = "auto"  # with a run: where it scores
    beam: tuple[str, ...] = ()  # Beam pipeline options

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.enrichment not in ENRICHMENT_MODES:
            raise UserError(
                f"--enrichment must be one of {', '.join(ENRICHMENT_MODES)}, got {self.enrichment!r}"
            )

    @classmethod
    def from_args(cls, args: argparse.Namespace, beam: Sequence[str]) -> ScoreBatchRequest:
        # Imported here: this module's import block is left to the enrichment work under way.
        from nlpctr.pipelines.flags import request_from_args

        return request_from_args(
            cls, args, splits=tuple(args.splits) if args.splits else None, beam=tuple(beam)
        )


@dataclass(frozen=True)
class ScoreBatchSummary:
    """What a score-batch run wrote: rows, null features per feature, and its rate."""

    service: str
    run: str | None
    device: str | None  # where the run scored (None without a run)
    enrichment: str
    batch_size: int  # rows per lookup (1 per element)
    rows: int
    rows_with_nulls: int
    null_counts: dict[str, int]
    wall_seconds: float
    cpu_seconds: float  # this process's (all of the job's with an in-process runner)
    rows_per_second: float
    out: str
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> dict[str, Any]:
    """`nlpctr score-batch`: the flags as a `ScoreBatchRequest` to `score_batch`; returns counts,
    timing and a `summary` line. `test_pipeline` (a `TestPipeline`) replaces the pipeline built
    from the Beam options, as in Beam's own examples."""
    args, beam_args = parse_args(argv)
    return score_batch(ScoreBatchRequest.from_args(args, beam_args), test_pipeline).to_dict()


def score_batch(request: ScoreBatchRequest, test_pipeline: beam.Pipeline | None = None) -> ScoreBatchSummary:
    """Enrich impressions from the online store, and score them with a trained run when asked.

    Args:
        request: the folder, the service, the enrichment and the run.
        test_pipeline: replaces the pipeline built from `request.beam` (tests).

    Returns:
        The rows written, null features counted per feature, and the rate.

    Raises:
        UserError: a store not applied, stale or not materialised, an online store lost mid-run
            (one line, not a crash), a run that is unfinished, damaged or of another dataset, or
            an output folder that is not the job's.
    """
    device = launch_device(request.device, PipelineOptions(list(request.beam)))
    data_dir = Path(request.data).resolve()
    with prepared.reading(data_dir, prepared.STORE_FOLDERS):  # a damaged file named, with its fix
        return _score(request, device, data_dir, test_pipeline)


def check_run(run_dir: Path, data_dir: Path, allow_other_dataset: bool) -> dict[str, Any]:
    """A finished run whose checkpoint loads and which was trained on this dataset (or the user
    says to score anyway); returns its run.json. Raises UserError before the pipeline otherwise."""
    spec_path = RunLayout(run_dir).run
    if not spec_path.is_file():
        raise UserError(f"{run_dir} is not a finished run (no {RunLayout.RUN}); train it with `nlpctr train`")
    try:
        spec = json.loads(spec_path.read_text())
        checkpoint = run_dir / spec["checkpoint"]
        service = spec["service"]
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"{spec_path} is damaged; delete the run and retrain it (`rm -r {run_dir}`, then rerun its "
            "`nlpctr train`)"
        ) from None
    here = DatasetIdentity.of_manifest(Manifest.read(data_dir))
    trained = DatasetIdentity.of_run(run_dir, spec)
    if not trained.admits(here) and not allow_other_dataset:
        raise UserError(
            f"run {run_dir.name} was trained on dataset {trained.describe(spec.get('data_dir'))}, "
            f"not on {here.describe(data_dir)}: its ID vocabularies and CTR history mean nothing "
            "here, so its scores would be wrong without a word; score a folder of its own dataset, or "
            "pass --allow-other-dataset"
        )
    load_checkpoint(checkpoint)  # missing or damaged: one line now, not inside a worker
    return {**spec, "service": service}


def scored_service(request: ScoreBatchRequest, data_dir: Path) -> tuple[str, Path | None]:
    """The service to enrich from (the run's when scoring; else `cascade_frozen` by default) and
    the run's folder, checked."""
    if request.run is None:
        return request.service or CASCADE_FROZEN, None
    run_dir = (request.runs_dir / request.run).resolve()
    trained_service = check_run(run_dir, data_dir, request.allow_other_dataset)["service"]
    if request.service not in (None, trained_service):
        raise UserError(
            f"run {request.run} was trained on service {trained_service!r}, not {request.service!r}"
        )
    return trained_service, run_dir


def _build(
    pipeline: beam.Pipeline,
    request: ScoreBatchRequest,
    online: feature_store.OnlineFeatures,
    service: str,
    schema: pa.Schema,
    staging: Path,
    run_dir: Path | None,
    device: str,
) -> None:
    """The job's graph: read, enrich (batched or per element), count nulls, score with the run
    when there is one, write `schema`'s columns into `staging`."""
    data_dir = online.data_dir
    config_path = store_config.config_path(data_dir)
    pattern = str(data_dir / IMPRESSIONS / "*.parquet")
    if request.enrichment == "batched":
        lookup = feature_store.OnlineFeatureLookup(config_path, service)
        batches = (
            pipeline
            | "ReadImpressions" >> ReadImpressionBatches(pattern, request.splits)
            | "Enrich" >> beam.ParDo(EnrichBatches(lookup, request.batch_size)).with_output_types(pa.Table)
        )
    else:
        handler = per_element_handler(config_path, service, online.keys)
        batches = (
            pipeline
            | "ReadImpressions" >> ReadImpressionRows(pattern, request.splits)
            | "Enrich" >> EnrichFromOnlineStore(handler, schema, online.feature_names)
        )
    batches = batches | "CountNulls" >> beam.ParDo(CountNulls(online.feature_names)).with_output_types(
        pa.Table
    )
    if run_dir is not None:
        batches = batches | "Score" >> ScoreWithRun(run_dir, device)
        schema = schema.append(pa.field("p", pa.float64()))
    written = schema
    _ = (
        batches
        | "ToSchema" >> beam.Map(lambda t: t.select(written.names).cast(written)).with_output_types(pa.Table)
        | "Write"
        >> beam.io.WriteToParquetBatched(str(staging / "part"), written, file_name_suffix=".parquet")
    )


def job_counters(result: PipelineResult) -> dict[str, int]:
    """The job's counters (`METRICS_NAMESPACE`) by name: rows, null counts."""
    query = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))
    return {c.key.metric.name: c.committed for c in query["counters"]}


def _score(
    request: ScoreBatchRequest, device: str, data_dir: Path, test_pipeline: beam.Pipeline | None
) -> ScoreBatchSummary:
    service, run_dir = scored_service(request, data_dir)
    # Before any work: --out is new, empty or an earlier score-batch output, holding no input.
    default_out = data_dir / SCORED / request.run if request.run else data_dir / ENRICHED / service
    inputs = [data_dir / IMPRESSIONS, *([run_dir] if run_dir is not None else [])]
    out = Path(request.out or default_out).expanduser().resolve()
    claim_output_dir(out, JOB, inputs=inputs)
    # Fail before the pipeline starts: not applied, stale, not materialised, Redis down.
    online = feature_store.OnlineFeatures(data_dir, service)
    if not parquet_files(data_dir / IMPRESSIONS):
        raise UserError(f"{data_dir} has no impressions; run `nlpctr data prepare` into it")
    manifest = read_manifest(data_dir)
    schema = output_schema(
        manifest.get("context_columns", []),
        feature_store.service_fields(online.service),
        manifest.get("numeric_columns", []),
    )
    with staged_output(out, JOB, inputs=inputs) as staging:
        started, cpu_started = time.perf_counter(), time.process_time()
        pipeline = (
            test_pipeline
            if test_pipeline is not None
            else beam.Pipeline(options=PipelineOptions(list(request.beam)))
        )
        _build(pipeline, request, online, service, schema, staging, run_dir, device)
        result = run_reporting_store_faults(pipeline, online.store)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        counters = job_counters(result)
    rows = int(counters.get("rows", 0))
    nulls = {n: int(counters.get(f"null:{n}", 0)) for n in online.feature_names}
    with_nulls = int(counters.get("rows_with_nulls", 0))
    scored = f", scored by run {request.run}" if request.run else ""
    summary = (
        f"score-batch {service} ({request.enrichment}{scored}): {rows} rows enriched in {wall:.1f} s "
        f"({rows / max(wall, 1e-9):.0f} rows/s); {with_nulls} row(s) with a null feature; -> {out}"
    )
    return ScoreBatchSummary(
        service=service,
        run=request.run,
        device=device if request.run else None,
        enrichment=request.enrichment,
        batch_size=request.batch_size if request.enrichment == "batched" else 1,
        rows=rows,
        rows_with_nulls=with_nulls,
        null_counts=nulls,
        wall_seconds=round(wall, 3),
        cpu_seconds=round(cpu, 3),
        rows_per_second=rows / max(wall, 1e-9),
        out=str(out),
        summary=summary,
    )
