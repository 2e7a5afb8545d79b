"""Ingest: a source log -> validated impressions (parquet), dead-letter records and a manifest.

    nlpctr data prepare --dataset upworthy --out data/upworthy [--seed 0] [beam options]

The pipeline is built from standard PipelineOptions, so `--runner` picks DirectRunner (the
default), Dask (`--runner nlpctr.pipelines.dask_runner.DaskRunner [--dask_client_address
tcp://HOST:PORT]`), FlinkRunner, SparkRunner or DataflowRunner without code changes. Every
source record ends as exactly one written row or one rejected record; the manifest's counts
are computed inside the pipeline and checked: rows_in == rows_written + rows_rejected.

Memory stays flat as the log grows: the source is read twice, first to find the impression
ids that occur more than once (64-bit hashes in a combiner), then to stream every row to the
sink; only the rows of repeated ids go through a shuffle (GroupByKey) to be deduplicated.
Those kept rows are written as `impressions/deduped-*.parquet` beside `impressions/part-*`.
"""

from __future__ import annotations

import argparse
import csv
import glob
import gzip
import hashlib
import json
import logging
import math
import os
import shutil
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.options.pipeline_options import PipelineOptions

from nlpctr import __version__
from nlpctr.errors import UserError
from nlpctr.layout import IMPRESSIONS, REJECTED, write_manifest
from nlpctr.models.schema import SPLITS, impression_schema, unit_interval
from nlpctr.pipelines import ubi
from nlpctr.pipelines.loopback import direct_runner_on_loopback
from nlpctr.pipelines.outputs import WriteCounts, publish, read_counts, staging_dir
from nlpctr.pipelines.ownership import MARKER, claim_output_dir, is_output_of
from nlpctr.pipelines.records import (
    DUPLICATE_IMPRESSION_ID,
    Limits,
    Mapped,
    Rejection,
    compression_of,
    delimited_head,
    has_lines,
    json_safe,
    map_record,
    parse_delimited,
    parse_json_line,
)
from nlpctr.pipelines.specs import DatasetSpec, load_spec

LOG = logging.getLogger(__name__)
STATS_FILE = "_stats.json"
JOB = "data prepare"


# ------------------------------------------------------------------------------- reading


class ReadSourceRecords(beam.PTransform):
    """Source file(s) -> {"records": raw records (dicts of source columns, or malformed
    markers), "stats": counter pairs for source facts that are not rows (e.g. UBI click
    events with no impression)}."""

    def __init__(self, spec: DatasetSpec) -> None:
        super().__init__()
        self.spec = spec

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.pvalue.PCollection]:
        spec = self.spec
        if spec.source.format == "ubi_ndjson":
            lines = pbegin | "ReadLines" >> beam.io.ReadFromText(
                literal_pattern(spec.source.path),
                coder=beam.coders.BytesCoder(),
                compression_type=text_compression(spec.source.path),
            )
            return lines | "JoinUbiEvents" >> JoinUbiEvents()
        return {
            "records": pbegin | "ReadRecords" >> self._read_records(),
            "stats": pbegin | "NoSourceStats" >> beam.Create([]),
        }

    def _read_records(self) -> beam.PTransform:
        spec = self.spec
        path = literal_pattern(spec.source.path)
        if spec.source.format == "parquet":
            return beam.io.ReadFromParquet(path)
        if spec.source.format == "csv":
            # Whole files, not lines: quoted fields may hold newlines. The bytes as they are
            # (parse_delimited unzips gzip by content; Beam would go by the name, and its
            # decompressing reader returns only the first 16 MiB to a plain read()).
            return (
                "MatchFiles" >> fileio.MatchFiles(path)
                | "ReadMatches" >> fileio.ReadMatches(compression=CompressionTypes.UNCOMPRESSED)
                | "ParseDelimited"
                >> beam.FlatMap(
                    lambda f, d: parse_delimited(f.read(), d, os.path.basename(f.metadata.path)),
                    spec.source.delimiter,
                )
            )
        return (
            "ReadLines"
            >> beam.io.ReadFromText(
                path, coder=beam.coders.BytesCoder(), compression_type=text_compression(spec.source.path)
            )
            | "ParseJson" >> beam.Map(parse_json_line)
            | "SkipBlank" >> beam.Filter(lambda r: r is not None)
        )


def literal_pattern(path: Path) -> str:
    """The pattern that matches exactly the file `path`: Beam's readers take a glob, so a
    file named `base[1].csv` would read `base1.csv` instead (and fail when none matches)."""
    return glob.escape(str(path))


def first_bytes(path: Path, n: int = 16) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(n)


def text_compression(path: Path) -> str:
    """How Beam should read a line-based source: by its content, not its name (a plain file
    named .gz is plain; a gzipped one named .jsonl is gzip)."""
    gzipped = compression_of(first_bytes(path)) == "gzip"
    return CompressionTypes.GZIP if gzipped else CompressionTypes.UNCOMPRESSED


def check_compression(path: Path, spec_name: str) -> None:
    """Gzip is read (checked to the end here, so damage is one line, not a failed worker);
    another compression is refused in one line."""
    compression = compression_of(first_bytes(path))
    if compression is None:
        return
    if compression != "gzip":
        raise UserError(
            f"source {path.name} is {compression}-compressed; decompress it, or gzip it "
            f"(plain and gzipped files are read), and fix source.path in {spec_name}"
        )
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(
            f"source {path.name} is a damaged gzip file ({type(exc).__name__}); fix or replace the file"
        ) from None


# An escaped `[` is the set `[[]`, which Beam compiles into a regex that Python warns about.
warnings.filterwarnings(
    "ignore", message="Possible nested set", category=FutureWarning, module="apache_beam.io.filesystem"
)


class JoinUbiEvents(beam.PTransform):
    """UBI bulk lines -> one record per impression event, with its click label, product title
    and query text joined in by key (CoGroupByKey, so it scales past memory)."""

    def expand(self, lines: beam.pvalue.PCollection) -> dict[str, beam.pvalue.PCollection]:
        items = lines | "Classify" >> beam.FlatMap(ubi.classify_line)
        by_tag = items | "ByTag" >> beam.Partition(lambda item, _: _UBI_TAGS.index(item[0]), len(_UBI_TAGS))
        tagged = dict(zip(_UBI_TAGS, by_tag, strict=True))
        kv = {
            tag: tagged[tag] | f"Key{tag}" >> beam.Map(lambda item: (item[1], item[2])) for tag in _UBI_TAGS
        }
        labelled = (
            {ubi.IMPRESSION: kv[ubi.IMPRESSION], ubi.CLICK: kv[ubi.CLICK]}
            | "GroupByImpression" >> beam.CoGroupByKey()
            | "JoinClicks" >> beam.FlatMapTuple(ubi.label_impressions)
        )
        records = labelled | "Records" >> beam.Filter(lambda kv_: kv_[0] == "record") | beam.Values()
        orphans = labelled | "OrphanClicks" >> beam.Filter(lambda kv_: kv_[0] == "orphan_click")
        titled = (
            {
                "records": records | "ByObject" >> beam.Map(lambda r: (str(r["object_id"]), r)),
                ubi.TITLE: kv[ubi.TITLE],
            }
            | "GroupByObject" >> beam.CoGroupByKey()
            | "FillTitle" >> beam.FlatMapTuple(ubi.fill_title)
        )
        with_query = (
            {
                "records": titled | "BySearch" >> beam.Map(lambda r: (str(r["search_id"]), r)),
                ubi.QUERY: kv[ubi.QUERY],
            }
            | "GroupBySearch" >> beam.CoGroupByKey()
            | "FillQuery" >> beam.FlatMapTuple(ubi.fill_query)
        )
        malformed = tagged[ubi.MALFORMED] | "Malformed" >> beam.Map(lambda item: item[2])
        # Source facts for the manifest: events that are not rows, and clicks with no impression.
        stats = (
            tagged[ubi.CLICK] | "CountClicks" >> beam.Map(lambda _: ("source:click_events", 1)),
            orphans | "CountOrphans" >> beam.MapTuple(lambda _, n: ("source:click_events_unmatched", n)),
            tagged[ubi.OTHER_EVENT] | "CountOther" >> beam.Map(lambda _: ("source:other_events", 1)),
            tagged[ubi.QUERY] | "CountQueries" >> beam.Map(lambda _: ("source:query_documents", 1)),
        ) | "FlattenUbiStats" >> beam.Flatten()
        return {"records": (with_query, malformed) | "AllRecords" >> beam.Flatten(), "stats": stats}


_UBI_TAGS = (ubi.QUERY, ubi.IMPRESSION, ubi.CLICK, ubi.TITLE, ubi.MALFORMED, ubi.OTHER_EVENT)


# ------------------------------------------------------------------------------- validating


class MapToSchema(beam.DoFn):
    """Raw record -> canonical row (main output) or Rejection (`rejected` output)."""

    REJECTED = "rejected"  # the output tag; the folder the rejections land in is layout.REJECTED

    def __init__(self, spec: DatasetSpec, limits: Limits) -> None:
        self.spec = spec
        self.limits = limits

    def process(self, record: dict[str, Any]) -> Iterator[Any]:
        result = map_record(self.spec, record, self.limits)
        if isinstance(result, Rejection):
            yield beam.pvalue.TaggedOutput(self.REJECTED, result)
        else:
            yield result


def id_hash(impression_id: str) -> int:
    """A 64-bit digest of an impression id, the same in every process (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(impression_id.encode("utf-8"), digest_size=8).digest(), "little")


class RepeatedIdHashes(beam.CombineFn):
    """id hashes -> the frozenset of those seen more than once, in compact numpy arrays
    (8 bytes per distinct id), so a log of millions of ids needs tens of MB, not a shuffle."""

    COMPACT_EVERY = 1 << 18

    def create_accumulator(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        empty = np.empty(0, np.uint64)
        return empty, empty, []  # distinct hashes, repeated hashes, not yet compacted

    def add_input(self, acc: tuple[np.ndarray, np.ndarray, list[int]], h: int) -> Any:
        acc[2].append(h)
        return self._compact(acc) if len(acc[2]) >= self.COMPACT_EVERY else acc

    @staticmethod
    def _compact(acc: tuple[np.ndarray, np.ndarray, list[int]]) -> tuple[np.ndarray, np.ndarray, list[int]]:
        return RepeatedIdHashes._merge([acc[0], np.array(acc[2], np.uint64)], [acc[1]])

    @staticmethod
    def _merge(distinct: list[np.ndarray], repeated: list[np.ndarray]) -> Any:
        values, counts = np.unique(np.concatenate(distinct), return_counts=True)
        return values, np.union1d(np.concatenate(repeated), values[counts > 1]), []

    def merge_accumulators(self, accs: Iterable[tuple[np.ndarray, np.ndarray, list[int]]]) -> Any:
        compacted = [self._compact(acc) for acc in accs]
        return self._merge([a[0] for a in compacted], [a[1] for a in compacted])

    def extract_output(self, acc: tuple[np.ndarray, np.ndarray, list[int]]) -> frozenset[int]:
        return frozenset(int(h) for h in self._compact(acc)[1])


class FindRepeatedIds(beam.PTransform):
    """A first pass over the valid rows: which impression ids may occur more than once
    (their 64-bit hashes; a rare collision only sends a unique row through the exact
    deduplication), and their timestamps (for the time split's cut points)."""

    def __init__(self, spec: DatasetSpec, limits: Limits) -> None:
        super().__init__()
        self.spec = spec
        self.limits = limits

    def expand(self, records: beam.pvalue.PCollection) -> dict[str, beam.pvalue.PCollection]:
        spec, limits = self.spec, self.limits

        def valid_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
            result = map_record(spec, record, limits)
            return [] if isinstance(result, Rejection) else [result.row]

        rows = records | "ValidRows" >> beam.FlatMap(valid_rows)
        repeated = (
            rows
            | "IdHashes" >> beam.Map(lambda r: id_hash(r["impression_id"]))
            | "Repeated" >> beam.CombineGlobally(RepeatedIdHashes())
        )
        timestamps = rows | "Timestamps" >> beam.Map(lambda r: r["event_timestamp"])
        return {"repeated": repeated, "timestamps": timestamps}


def _truncated_counts(mapped: Mapped) -> list[tuple[str, int]]:
    return [(f"truncated:{column}", 1) for column in mapped.truncated]


def _keep_first(impression_id: str, mapped: Iterable[Mapped]) -> Iterator[Any]:
    """Keep one row per impression_id (the smallest by content, then by source record, so
    reruns agree); the others go to the dead-letter output as duplicates, with their original
    source records."""
    ordered = sorted(
        mapped,
        key=lambda m: (
            json.dumps(m.row, sort_keys=True, default=str),
            json.dumps(json_safe(m.source), sort_keys=True),
        ),
    )
    yield ordered[0]
    for extra in ordered[1:]:
        yield beam.pvalue.TaggedOutput(
            MapToSchema.REJECTED,
            Rejection(
                DUPLICATE_IMPRESSION_ID,
                f"impression_id {impression_id!r} seen more than once",
                extra.source if extra.source is not None else extra.row,
            ),
        )


class ValidateImpressions(beam.PTransform):
    """Map, validate and deduplicate; returns the rows as two streams (those whose id occurs
    once, and the kept one of each repeated id), the rejections and truncated-column counters.

    Only rows whose id is in `repeated` (a side input from `FindRepeatedIds`) are shuffled
    to deduplicate; every other row streams from the source to the sink, so memory does not
    grow with the log on runners that hold a shuffle in memory (the DirectRunner).
    """

    def __init__(self, spec: DatasetSpec, limits: Limits, repeated: beam.pvalue.PCollection) -> None:
        super().__init__()
        self.spec = spec
        self.limits = limits
        self.repeated = repeated

    def expand(self, records: beam.pvalue.PCollection) -> tuple[Any, Any, Any]:
        mapped = records | "Map" >> beam.ParDo(MapToSchema(self.spec, self.limits)).with_outputs(
            MapToSchema.REJECTED, main="rows"
        )
        once, maybe_repeated = mapped.rows | "ByIdCount" >> beam.Partition(
            lambda m, _, repeated: int(id_hash(m.row["impression_id"]) in repeated),
            2,
            beam.pvalue.AsSingleton(self.repeated),
        )
        deduped = (
            maybe_repeated
            | "KeyById" >> beam.Map(lambda m: (m.row["impression_id"], m))
            | "GroupById" >> beam.GroupByKey()
            | "KeepFirst" >> beam.FlatMapTuple(_keep_first).with_outputs(MapToSchema.REJECTED, main="rows")
        )
        truncated = tuple(
            kept
            | f"CountTruncated{i}" >> beam.FlatMap(lambda m: [(f"truncated:{c}", 1) for c in m.truncated])
            for i, kept in enumerate((once, deduped.rows))
        )
        streams = (
            once | "Rows" >> beam.Map(lambda m: m.row),
            deduped.rows | "DedupedRows" >> beam.Map(lambda m: m.row),
        )
        rejected = (
            mapped[MapToSchema.REJECTED],
            deduped[MapToSchema.REJECTED],
        ) | "AllRejected" >> beam.Flatten()
        return streams, rejected, truncated


# ------------------------------------------------------------------------------- splitting


def split_of(u: float, fractions: tuple[float, float, float]) -> str:
    if u < fractions[0]:
        return SPLITS[0]
    if u < fractions[0] + fractions[1]:
        return SPLITS[1]
    return SPLITS[2]


class AssignSplits(beam.PTransform):
    """Deterministic train/valid/test by seed.

    within_group: each row independently (rows of one group fall across splits);
    cold_group: whole groups; time: by event_timestamp, at `cut_points` (a singleton from
    `TimeCutPoints`; earliest rows train).
    """

    def __init__(
        self,
        mode: str,
        fractions: tuple[float, float, float],
        seed: int,
        group: str,
        cut_points: beam.pvalue.PCollection | None = None,
    ) -> None:
        super().__init__()
        self.mode, self.fractions, self.seed, self.group = mode, fractions, seed, group
        self.cut_points = cut_points

    def expand(self, rows: beam.pvalue.PCollection) -> beam.pvalue.PCollection:
        fractions, seed, group = self.fractions, self.seed, self.group
        if self.mode == "within_group":
            return rows | "SplitRows" >> beam.Map(
                lambda r: {**r, "split": split_of(unit_interval(seed, "row", r["impression_id"]), fractions)}
            )
        if self.mode == "cold_group":

            def by_group(row: dict[str, Any]) -> dict[str, Any]:
                # A row with no group value is its own group.
                key = row.get(group) or f"row:{row['impression_id']}"
                return {**row, "split": split_of(unit_interval(seed, "group", key), fractions)}

            return rows | "SplitGroups" >> beam.Map(by_group)

        def by_time(row: dict[str, Any], cuts: tuple[Any, Any]) -> dict[str, Any]:
            ts = row["event_timestamp"]
            split = SPLITS[0] if ts <= cuts[0] else SPLITS[1] if ts <= cuts[1] else SPLITS[2]
            return {**row, "split": split}

        if self.cut_points is None:
            raise ValueError("the time split needs cut_points")
        return rows | "SplitTime" >> beam.Map(by_time, beam.pvalue.AsSingleton(self.cut_points))


class TimeCutPoints(beam.PTransform):
    """Timestamps -> (last train time, last valid time), from approximate quantiles (bounded
    memory; exact while the data fits the combiner's buffers); rows tied at a cut go to the
    earlier split. The timestamps are those of every valid row, before deduplication, so the
    cut points are known before any row is written."""

    def __init__(self, fractions: tuple[float, float, float]) -> None:
        super().__init__()
        self.fractions = fractions

    def expand(self, timestamps: beam.pvalue.PCollection) -> beam.pvalue.PCollection:
        return (
            timestamps
            | "Quantiles" >> beam.transforms.stats.ApproximateQuantiles.Globally(QUANTILES + 1)
            | "CutPoints" >> beam.Map(_time_cut_points, self.fractions)
        )


QUANTILES = 1000


def _time_cut_points(quantiles: list[Any], fractions: tuple[float, float, float]) -> tuple[Any, Any]:
    """Timestamps at the train and valid fractions, from evenly spaced quantiles (all the
    sorted timestamps when there are fewer rows than QUANTILES)."""
    last = len(quantiles) - 1
    return quantiles[round(fractions[0] * last)], quantiles[round((fractions[0] + fractions[1]) * last)]


# ------------------------------------------------------------------------------- the job


def build_pipeline(
    pipeline: beam.Pipeline,
    spec: DatasetSpec,
    staging: Path,
    seed: int,
    split_mode: str,
    limits: Limits,
    num_shards: int,
) -> None:
    """Two reads of the source: the first finds the repeated ids (and the time split's cut
    points); the second streams every row to the sink, shuffling only the repeated ids."""
    first_pass = pipeline | "ReadForIds" >> ReadSourceRecords(spec)
    ids = first_pass["records"] | "FindRepeatedIds" >> FindRepeatedIds(spec, limits)
    cut_points = (
        ids["timestamps"] | "TimeCutPoints" >> TimeCutPoints(spec.split_fractions)
        if split_mode == "time"
        else None
    )

    source = pipeline | "ReadSource" >> ReadSourceRecords(spec)
    records = source["records"]
    streams, rejected, truncated = records | "Validate" >> ValidateImpressions(spec, limits, ids["repeated"])
    counters = [
        records | "CountIn" >> beam.Map(lambda _: ("rows_in", 1)),
        rejected | "CountRejected" >> beam.Map(lambda r: (f"rejected:{r.reason}", 1)),
        *truncated,
        source["stats"],
    ]
    schema = impression_schema(spec.context_columns)
    # Two sinks into one folder, not a Flatten: a runner may materialise a Flatten's inputs.
    for name, prefix, shards, stream in (
        ("", "part", num_shards, streams[0]),
        ("Deduped", "deduped", min(num_shards, 1), streams[1]),
    ):
        rows = stream | f"AssignSplits{name}" >> AssignSplits(
            split_mode, spec.split_fractions, seed, spec.group, cut_points
        )
        _ = rows | f"WriteImpressions{name}" >> beam.io.WriteToParquet(
            str(staging / IMPRESSIONS / prefix), schema, file_name_suffix=".parquet", num_shards=shards
        )
        counters += [
            rows | f"CountWritten{name}" >> beam.Map(lambda r: ("rows_written", 1)),
            rows | f"CountSplits{name}" >> beam.Map(lambda r: (f"split:{r['split']}", 1)),
            rows
            | f"CountSplitImpressions{name}"
            >> beam.Map(lambda r: (f"split_impressions:{r['split']}", r["impressions"])),
            rows
            | f"CountSplitClicks{name}" >> beam.Map(lambda r: (f"split_clicks:{r['split']}", r["clicks"])),
        ]
    _ = (
        rejected
        | "RejectedJson" >> beam.Map(lambda r: r.to_json())
        | "WriteRejected"
        >> beam.io.WriteToText(
            str(staging / REJECTED / "part"), file_name_suffix=".jsonl", num_shards=num_shards
        )
    )
    _ = tuple(counters) | "CountOutcomes" >> WriteCounts(str(staging / STATS_FILE))


def manifest_from_counts(
    spec: DatasetSpec, counts: dict[str, int], seed: int, split_mode: str, limits: Limits, wall_s: float
) -> dict[str, Any]:
    rows_in = counts.get("rows_in", 0)
    rows_written = counts.get("rows_written", 0)
    rejected_by_reason = {
        k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("rejected:")
    }
    rows_rejected = sum(rejected_by_reason.values())
    return {
        "dataset": spec.name,
        "description": spec.description,
        "spec_path": str(spec.spec_path),
        "spec_hash": spec.spec_hash,
        "spec": spec.raw,
        "source": str(spec.source.path),
        "rows_in": rows_in,
        "rows_written": rows_written,
        "rows_rejected": rows_rejected,
        "rejected_by_reason": rejected_by_reason,
        "rows_truncated": {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("truncated:")},
        "source_stats": {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("source:")},
        "split": {
            "mode": split_mode,
            "seed": seed,
            "fractions": list(spec.split_fractions),
            "group": spec.group,
            "rows": {s: counts.get(f"split:{s}", 0) for s in SPLITS},
            "impressions": {s: counts.get(f"split_impressions:{s}", 0) for s in SPLITS},
            "clicks": {s: counts.get(f"split_clicks:{s}", 0) for s in SPLITS},
        },
        "context_columns": list(spec.context_columns),
        "entities": list(spec.entities),
        "group": spec.group,
        "label_form": spec.label.form,
        "limits": {"max_text_chars": limits.max_text_chars, "truncate_long_text": limits.truncate_long_text},
        "code_version": __version__,
        "wall_seconds": round(wall_s, 3),
    }


def source_columns(spec: DatasetSpec) -> list[str] | None:
    """The columns the source offers, read from its header; None where records are free-form
    (JSONL rows may each carry different keys, so a missing one is a row-level rejection)."""
    path = spec.source.path
    if not path.exists():
        raise UserError(f"source file {path} does not exist; fix source.path in {spec.spec_path.name}")
    if not path.is_file():
        raise UserError(
            f"source {path} is not a file; point source.path in {spec.spec_path.name} at one file"
        )
    fix = f"point source.path in {spec.spec_path.name} at a log that holds records"
    try:
        if spec.source.format != "parquet":
            check_compression(path, spec.spec_path.name)
        if spec.source.format == "parquet":
            if pq.read_metadata(path).num_rows == 0:
                raise UserError(f"source {path.name} has no rows; {fix}")
            return list(pq.read_schema(path).names)
        if spec.source.format == "csv":
            header, has_rows = delimited_head(str(path), spec.source.delimiter)
            if not header:
                raise UserError(f"source {path.name} is empty (no header row); {fix}")
            if not has_rows:
                raise UserError(f"source {path.name} has a header row but no rows; {fix}")
            return header
        if not has_lines(str(path)):
            raise UserError(f"source {path.name} is empty; {fix}")
    except (OSError, ValueError, csv.Error) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"source {path.name} is not a readable {spec.source.format} file ({first}); "
            "fix source.format in the spec or the file"
        ) from None
    if spec.source.format == "ubi_ndjson":
        return ["search_id", "object_id", "user_query", "title", "position", "timestamp",
                "application", "session_id", "clicked"]  # fmt: skip
    return None


def rejection_message(manifest: dict[str, Any], max_reject_rate: float, out: Path, failed: Path) -> str:
    """Why a run wrote nothing: no rows at all, every row rejected, or too many rejected."""
    rows_in, rejected = manifest["rows_in"], manifest["rows_rejected"]
    reasons = ", ".join(f"{k}={v}" for k, v in manifest["rejected_by_reason"].items()) or "none"
    if rows_in == 0:
        return (
            f"source {Path(manifest['source']).name} has no rows; nothing was written to {out}; "
            "point source.path at a log that holds records"
        )
    if manifest["rows_written"] == 0:
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
    parser = _ArgumentParser(
        prog="nlpctr data prepare", description="Validate a source log into canonical impressions."
    )
    parser.add_argument("--dataset", required=True, help="bundled dataset name or path of a YAML spec")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="split seed")
    parser.add_argument(
        "--split-mode",
        choices=["within_group", "cold_group", "time"],
        default=None,
        help="overrides the spec's split mode",
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
    args, beam_args = parser.parse_known_args(argv)
    check_args(args)
    return args, beam_args


def check_args(args: argparse.Namespace) -> None:
    """Flags that parse but mean nothing are refused before any work (not after the job ran)."""
    rate = args.max_reject_rate
    if rate is not None and not (math.isfinite(rate) and 0 <= rate <= 1):
        raise UserError(
            f"--max-reject-rate {rate:g} is not a fraction between 0 and 1; pass e.g. 0.05 for 5%"
        )
    if args.max_text_chars is not None and args.max_text_chars < 1:
        raise UserError(f"--max-text-chars {args.max_text_chars} must be at least 1 (characters per text)")
    if args.num_shards < 0:
        raise UserError(f"--num-shards {args.num_shards} must be 0 (the runner decides) or a positive count")


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the ingest job; returns the manifest. Raises UserError for a user's mistake."""
    args, beam_args = parse_args(argv)
    spec = load_spec(args.dataset)
    available = source_columns(spec)
    if available is not None:
        spec.check_source_columns(available)
    limits = Limits(
        max_text_chars=args.max_text_chars or spec.max_text_chars, truncate_long_text=args.truncate_long_text
    )
    max_reject_rate = spec.max_reject_rate if args.max_reject_rate is None else args.max_reject_rate
    split_mode = args.split_mode or spec.split_mode
    out: Path = args.out.resolve()
    failed = out.parent / f"{out.name}.failed"
    # Before any work: --out (and its dead-letter folder) must be new, empty or this job's own
    # earlier output, and must not hold the spec or the source log.
    inputs = [spec.spec_path, spec.source.path]
    claim_output_dir(out, JOB, inputs=inputs)
    claim_output_dir(failed, JOB, inputs=inputs, flag="the dead-letter folder")
    staging = staging_dir(out)
    started = time.perf_counter()
    try:
        options = PipelineOptions(beam_args)
        with direct_runner_on_loopback(options), beam.Pipeline(options=options) as pipeline:
            build_pipeline(pipeline, spec, staging, args.seed, split_mode, limits, args.num_shards)
        counts = read_counts(staging / STATS_FILE)
        manifest = manifest_from_counts(
            spec, counts, args.seed, split_mode, limits, time.perf_counter() - started
        )
        if manifest["rows_in"] != manifest["rows_written"] + manifest["rows_rejected"]:
            raise RuntimeError(f"ingest lost rows: {counts}")  # a bug, not a user error
        manifest["max_reject_rate"] = max_reject_rate
        write_manifest(staging, manifest)
        rate = manifest["rows_rejected"] / max(manifest["rows_in"], 1)
        if manifest["rows_written"] == 0 or rate > max_reject_rate:
            claim_output_dir(failed, JOB, flag="the dead-letter folder")  # still ours (or absent)?
            shutil.rmtree(failed, ignore_errors=True)
            (staging / MARKER).unlink(missing_ok=True)  # recognised by its manifest, like DIR
            staging.rename(failed)
            raise UserError(rejection_message(manifest, max_reject_rate, out, failed))
        publish(staging, out, JOB)
        # A dead-letter folder left by an earlier failed run of the same output is stale now
        # (removed only when it is recognisably that: its manifest is this job's).
        if failed.is_dir() and not failed.is_symlink() and is_output_of(failed, JOB):
            shutil.rmtree(failed, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    reasons = ", ".join(f"{k}={v}" for k, v in manifest["rejected_by_reason"].items()) or "none"
    splits = ", ".join(f"{k}={v}" for k, v in manifest["split"]["rows"].items())
    summary = (
        f"prepared {spec.name}: {manifest['rows_in']} rows in, {manifest['rows_written']} written, "
        f"{manifest['rows_rejected']} rejected ({reasons}); splits {splits}; "
        f"{manifest['wall_seconds']:.1f} s -> {out}"
    )
    return {**manifest, "summary": summary}
