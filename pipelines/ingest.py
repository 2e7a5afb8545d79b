"""Ingest: a source log -> validated impressions (parquet), dead-letter records and a manifest.

    nlpctr data prepare --dataset upworthy --out data/upworthy [--seed 0] [beam options]

First Beam job of the flow (docs/DESIGN.md, "Data flow"); any runner via `--runner`. Every
source record ends as one written row or one rejected record (rows_in == rows_written +
rows_rejected, checked). Outputs: docs/USAGE.md, "Outputs of `nlpctr data prepare`"; the
two-pass deduplication: docs/DESIGN.md, "Modules in detail", ingest.py.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from nlpctr import __version__, prepared
from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError
from nlpctr.layout import IMPRESSIONS, REJECTED, Manifest, SplitRecord
from nlpctr.models.schema import SPLITS, impression_schema
from nlpctr.pipelines.flags import request_from_args
from nlpctr.pipelines.ingest_source import ReadSourceRecords, check_source, source_files
from nlpctr.pipelines.ingest_validate import AssignSplits, FindRepeatedIds, TimeCutPoints, ValidateImpressions
from nlpctr.pipelines.loopback import run_to_completion
from nlpctr.pipelines.outputs import WriteCounts, read_counts, staged_output
from nlpctr.pipelines.ownership import MARKER, claim_output_dir, is_output_of
from nlpctr.pipelines.records import Limits
from nlpctr.pipelines.specs import SPLIT_MODES, DatasetSpec, load_spec

LOG = logging.getLogger(__name__)
STATS_FILE = "_stats.json"
JOB = "data prepare"


# ------------------------------------------------------------------------------- the job


class SplitAndWriteImpressions(beam.PTransform):
    """Valid rows -> rows with their split, written as `<prefix>-*.parquet`; returns the
    counter pairs (rows written, and rows, impressions and clicks per split)."""

    def __init__(
        self, assign_splits: AssignSplits, file_path_prefix: str, schema: Any, num_shards: int
    ) -> None:
        super().__init__()
        self.assign_splits = assign_splits
        self.file_path_prefix, self.schema, self.num_shards = file_path_prefix, schema, num_shards

    def expand(self, rows: beam.pvalue.PCollection) -> tuple[beam.pvalue.PCollection, ...]:
        split = rows | "AssignSplits" >> self.assign_splits
        _ = split | "Write" >> beam.io.WriteToParquet(
            self.file_path_prefix, self.schema, file_name_suffix=".parquet", num_shards=self.num_shards
        )
        return (
            split | "CountWritten" >> beam.Map(lambda r: ("rows_written", 1)),
            split | "CountSplits" >> beam.Map(lambda r: (f"split:{r['split']}", 1)),
            split
            | "CountSplitImpressions"
            >> beam.Map(lambda r: (f"split_impressions:{r['split']}", r["impressions"])),
            split | "CountSplitClicks" >> beam.Map(lambda r: (f"split_clicks:{r['split']}", r["clicks"])),
        )


class WriteDeadLetters(beam.PTransform):
    """Rejections -> one JSON object per line (reason, message, source record) in `<prefix>-*.jsonl`."""

    def __init__(self, file_path_prefix: str, num_shards: int) -> None:
        super().__init__()
        self.file_path_prefix, self.num_shards = file_path_prefix, num_shards

    def expand(self, rejected: beam.pvalue.PCollection) -> beam.pvalue.PDone:
        return (
            rejected
            | "ToJson" >> beam.Map(lambda r: r.to_json())
            | "Write"
            >> beam.io.WriteToText(
                self.file_path_prefix, file_name_suffix=".jsonl", num_shards=self.num_shards
            )
        )


class PrepareImpressions(beam.PTransform):
    """The whole job: a source log -> impressions, dead letters and counts, under `staging`.

    Two reads of the source: the first finds the repeated ids (and the time split's cut
    points); the second streams every row to the sink, shuffling only the repeated ids.
    """

    def __init__(
        self, spec: DatasetSpec, staging: Path, seed: int, split_mode: str, limits: Limits, num_shards: int
    ) -> None:
        super().__init__()
        self.spec, self.staging, self.seed, self.split_mode = spec, staging, seed, split_mode
        self.limits, self.num_shards = limits, num_shards

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.PDone:
        spec, limits, staging, num_shards = self.spec, self.limits, self.staging, self.num_shards
        first_pass = pbegin | "ReadForIds" >> ReadSourceRecords(spec)
        ids = first_pass["records"] | "FindRepeatedIds" >> FindRepeatedIds(spec, limits)
        cut_points = (
            ids["timestamps"] | "TimeCutPoints" >> TimeCutPoints(spec.split_fractions)
            if self.split_mode == "time"
            else None
        )

        source = pbegin | "ReadSource" >> ReadSourceRecords(spec)
        records = source["records"]
        streams, rejected, truncated = records | "Validate" >> ValidateImpressions(
            spec, limits, ids["repeated"], ids["collided"]
        )
        counters = [
            records | "CountIn" >> beam.Map(lambda _: ("rows_in", 1)),
            rejected | "CountRejected" >> beam.Map(lambda r: (f"rejected:{r.reason}", 1)),
            ids["collided"]
            | "CountCollidedIds"
            >> beam.FlatMap(lambda collided: [(f"id_hash_collisions:{column}", 1) for column, _ in collided]),
            *truncated,
            source["stats"],
        ]
        schema = impression_schema(spec.context_columns, spec.numeric_columns)
        # Two sinks into one folder, not a Flatten: a runner may materialise a Flatten's inputs.
        for name, prefix, shards, stream in (
            ("", "part", num_shards, streams[0]),
            ("Deduped", "deduped", min(num_shards, 1), streams[1]),
        ):
            assign = AssignSplits(self.split_mode, spec.split_fractions, self.seed, spec.group, cut_points)
            counters += stream | f"WriteImpressions{name}" >> SplitAndWriteImpressions(
                assign, str(staging / IMPRESSIONS / prefix), schema, shards
            )
        _ = rejected | "WriteRejected" >> WriteDeadLetters(str(staging / REJECTED / "part"), num_shards)
        return tuple(counters) | "CountOutcomes" >> WriteCounts(str(staging / STATS_FILE))


def manifest_from_counts(
    spec: DatasetSpec,
    counts: dict[str, int],
    seed: int,
    split_mode: str,
    limits: Limits,
    wall_s: float,
    max_reject_rate: float,
) -> Manifest:
    rows_in = counts.get("rows_in", 0)
    rows_written = counts.get("rows_written", 0)
    rejected_by_reason = {
        k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("rejected:")
    }
    rows_rejected = sum(rejected_by_reason.values())
    return Manifest(
        dataset=spec.name,
        description=spec.description,
        spec_path=str(spec.spec_path),
        spec_hash=spec.spec_hash,
        spec=spec.raw,
        source=spec.source.location,
        source_layout=spec.source.layout,
        rows_in=rows_in,
        rows_written=rows_written,
        rows_rejected=rows_rejected,
        rejected_by_reason=rejected_by_reason,
        rows_truncated={k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("truncated:")},
        # Ids (per column) that two different source values hashed to; their rows are the
        # id_hash_collision dead letters.
        id_hash_collisions={
            k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("id_hash_collisions:")
        },
        source_stats={k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("source:")},
        split=SplitRecord(
            mode=split_mode,
            seed=seed,
            fractions=tuple(spec.split_fractions),
            group=spec.group,
            rows={s: counts.get(f"split:{s}", 0) for s in SPLITS},
            impressions={s: counts.get(f"split_impressions:{s}", 0) for s in SPLITS},
            clicks={s: counts.get(f"split_clicks:{s}", 0) for s in SPLITS},
        ),
        context_columns=tuple(spec.context_columns),
        # Numeric features: columns of the impressions, served by the `numeric` feature view.
        numeric_columns=tuple(spec.numeric_columns),
        entities=tuple(spec.entities),
        group=spec.group,
        label_form=spec.label.form,
        limits={"max_text_chars": limits.max_text_chars, "truncate_long_text": limits.truncate_long_text},
        code_version=__version__,
        wall_seconds=round(wall_s, 3),
        max_reject_rate=max_reject_rate,
    )


def rejection_message(manifest: Manifest, max_reject_rate: float, out: Path, failed: Path) -> str:
    """Why a run wrote nothing: no rows at all, every row rejected, or too many rejected."""
    rows_in, rejected = manifest.rows_in, manifest.rows_rejected
    reasons = ", ".join(f"{k}={v}" for k, v in manifest.rejected_by_reason.items()) or "none"
    if rows_in == 0:
        return (
            f"source {Path(manifest.source).name} has no rows; nothing was written to {out}; "
            f"point source.{manifest.source_layout} at a log that holds records"
        )
    if manifest.rows_written == 0:
        return (
            f"all {rows_in} rows were rejected (reasons: {reasons}); nothing was written to {out}; "
            f"the rejected records are in {failed / REJECTED}/; fix the source or the spec"
        )
    rate = rejected / rows_in
    shown, limit = f"{rate:.2%}", f"{max_reject_rate:.2%}"
    if shown == limit:  # 1.004% > 1%: show the digits that differ
        shown, limit = f"{rate:.4%}", f"{max_reject_rate:.4%}"
    return (
        f"{rejected} of {rows_in} rows rejected ({shown}) > --max-reject-rate {limit} (reasons: "
        f"{reasons}); nothing was written to {out}; the rejected records are in {failed / REJECTED}/; "
        "fix the source or the spec, or raise --max-reject-rate"
    )


class _ArgumentParser(argparse.ArgumentParser):
    """A flag that does not parse is a user's mistake: one line (UserError), not usage text."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The job's flags, and the rest: Beam pipeline options."""
    parser = _ArgumentParser(
        prog="nlpctr data prepare", description="Validate a source log into canonical impressions."
    )
    parser.add_argument("--dataset", required=True, help="bundled dataset name or path of a YAML spec")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument(
        "--split-mode", choices=SPLIT_MODES, default=None, help="overrides the spec's split mode"
    )
    parser.add_argument(
        "--max-reject-rate",
        type=float,
        default=None,
        help="fail when more than this fraction of rows is rejected (default: the "
        "spec's max_reject_rate, else 0.01)",
    )
    parser.add_argument("--max-text-chars", type=int, default=None, help="overrides the spec's limit")
    parser.add_argument(
        "--truncate-long-text",
        action="store_true",
        help="truncate texts over the limit (counted in the manifest) instead of rejecting",
    )
    parser.add_argument("--num-shards", type=int, default=0, help="output shards (0: the runner decides)")
    return parser.parse_known_args(argv)


@dataclass(frozen=True)
class PrepareRequest:
    """One `nlpctr data prepare` run, as its flags say it (None: the spec's value).

    Flags that parse but mean nothing are refused when the request is made, before any work.
    """

    dataset: str  # a bundled dataset's name or a spec's path
    out: Path
    seed: int = 0
    split_mode: str | None = None
    max_reject_rate: float | None = None
    max_text_chars: int | None = None
    truncate_long_text: bool = False
    num_shards: int = 0  # 0: the runner decides
    beam: tuple[str, ...] = ()  # Beam pipeline options

    def __post_init__(self) -> None:
        rate = self.max_reject_rate
        if rate is not None and not (math.isfinite(rate) and 0 <= rate <= 1):
            raise UserError(
                f"--max-reject-rate {rate:g} is not a fraction between 0 and 1; pass e.g. 0.05 for 5%"
            )
        if self.max_text_chars is not None and self.max_text_chars < 1:
            raise UserError(
                f"--max-text-chars {self.max_text_chars} must be at least 1 (characters per text)"
            )
        if self.num_shards < 0:
            raise UserError(
                f"--num-shards {self.num_shards} must be 0 (the runner decides) or a positive count"
            )
        if self.split_mode not in (None, *SPLIT_MODES):
            raise UserError(f"--split-mode must be one of {', '.join(SPLIT_MODES)}, got {self.split_mode!r}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, beam: Sequence[str]) -> PrepareRequest:
        return request_from_args(cls, args, beam=tuple(beam))


@dataclass(frozen=True)
class PrepareSummary:
    """What a prepare run wrote: its manifest (`DIR/manifest.json`) and a one-line summary."""

    manifest: Manifest
    summary: str

    def to_dict(self) -> JsonObject:
        """The manifest's JSON and the summary (what `nlpctr data prepare` prints)."""
        return {**self.manifest.to_json(), "summary": self.summary}


def source_reading(spec: DatasetSpec) -> contextlib.AbstractContextManager[None]:
    """`prepared.reading_source` for a parquet source (other formats are read line by line: a
    damaged line is a dead letter)."""
    if spec.source.format != "parquet":
        return contextlib.nullcontext()
    name = spec.spec_path.name
    fix = "replace it with a sound copy, or " + (
        f"point source.path in {name} at one"
        if spec.source.path is not None
        else f"leave it out of {spec.source.field} in {name}"
    )
    return prepared.reading_source(source_files(spec), fix)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> JsonObject:
    """`nlpctr data prepare`: the flags as a `PrepareRequest` to `prepare`; returns the manifest
    with a one-line `summary`. `test_pipeline` (a `TestPipeline`) replaces the pipeline built from
    the Beam options, as in Beam's own examples."""
    args, beam_args = parse_args(argv)
    return prepare(PrepareRequest.from_args(args, beam_args), test_pipeline).to_dict()


def prepare(request: PrepareRequest, test_pipeline: beam.Pipeline | None = None) -> PrepareSummary:
    """Validate a source log into impressions, dead letters and a manifest under `request.out`.

    Args:
        request: the dataset, the output folder and the job's settings.
        test_pipeline: replaces the pipeline built from `request.beam` (tests).

    Returns:
        The manifest written and a one-line summary.

    Raises:
        UserError: a bad spec or source, an output folder that is not the job's to write, or more
            rows rejected than the spec (or `max_reject_rate`) allows (nothing is published then;
            the dead letters are kept in `OUT.failed/`).
    """
    spec = load_spec(request.dataset)
    check_source(spec)
    limits = Limits(
        max_text_chars=request.max_text_chars or spec.max_text_chars,
        truncate_long_text=request.truncate_long_text,
    )
    max_reject_rate = spec.max_reject_rate if request.max_reject_rate is None else request.max_reject_rate
    split_mode = request.split_mode or spec.split_mode
    out = Path(request.out).resolve()
    failed = out.parent / f"{out.name}.failed"
    # Before any work: --out (and its dead-letter folder) must be new, empty or this job's own
    # earlier output, and must not hold the spec or the source log.
    inputs = [spec.spec_path, *spec.source.inputs]
    with staged_output(out, JOB, inputs=inputs) as staging:
        claim_output_dir(failed, JOB, inputs=inputs, flag="the dead-letter folder")
        # A parquet source damaged past its footer fails inside the job: named, with what to do.
        with source_reading(spec):
            started = time.perf_counter()
            pipeline = (
                test_pipeline
                if test_pipeline is not None
                else beam.Pipeline(options=PipelineOptions(list(request.beam)))
            )
            _ = pipeline | "PrepareImpressions" >> PrepareImpressions(
                spec, staging, request.seed, split_mode, limits, request.num_shards
            )
            run_to_completion(pipeline)
            counts = read_counts(staging / STATS_FILE)
            wall = time.perf_counter() - started
            manifest = manifest_from_counts(
                spec, counts, request.seed, split_mode, limits, wall, max_reject_rate
            )
            if manifest.rows_in != manifest.rows_written + manifest.rows_rejected:
                raise RuntimeError(f"ingest lost rows: {counts}")  # a bug, not a user error
            manifest.write(staging)
            rate = manifest.rows_rejected / max(manifest.rows_in, 1)
            if manifest.rows_written == 0 or rate > max_reject_rate:
                claim_output_dir(failed, JOB, flag="the dead-letter folder")  # still ours (or absent)?
                shutil.rmtree(failed, ignore_errors=True)
                (staging / MARKER).unlink(missing_ok=True)  # recognised by its manifest, like DIR
                staging.rename(failed)
                raise UserError(rejection_message(manifest, max_reject_rate, out, failed))
    # A dead-letter folder left by an earlier failed run of the same output is stale now
    # (removed only when it is recognisably that: its manifest is this job's).
    if failed.is_dir() and not failed.is_symlink() and is_output_of(failed, JOB):
        shutil.rmtree(failed, ignore_errors=True)
    reasons = ", ".join(f"{k}={v}" for k, v in manifest.rejected_by_reason.items()) or "none"
    splits = ", ".join(f"{k}={v}" for k, v in manifest.split.rows.items())
    summary = (
        f"prepared {spec.name}: {manifest.rows_in} rows in, {manifest.rows_written} written, "
        f"{manifest.rows_rejected} rejected ({reasons}); splits {splits}; "
        f"{manifest.wall_seconds:.1f} s -> {out}"
    )
    return PrepareSummary(manifest, summary)
