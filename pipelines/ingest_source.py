"""Ingest's reading side: a dataset spec's source file -> raw records (Beam), and the checks on
the file itself (exists, is readable, is not compressed some unreadable way, has the columns
the spec names) that run before any pipeline, so each fails in one line.

Rows are parsed by `source_files` (CSV/TSV, JSON lines) or joined from UBI events (`ubi`);
`records.map_record` validates them (`ingest_validate`).
"""

from __future__ import annotations

import csv
import glob
import gzip
import os
import warnings
import zlib
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io import fileio
from apache_beam.io.filesystem import CompressionTypes

from nlpctr.errors import UserError
from nlpctr.pipelines import ubi
from nlpctr.pipelines.source_files import (
    compression_of,
    delimited_head,
    has_lines,
    parse_delimited,
    parse_json_line,
)
from nlpctr.pipelines.specs import BUNDLED_SPEC_DIR, DatasetSpec


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


def source_columns(spec: DatasetSpec) -> list[str] | None:
    """The columns the source offers, read from its header; None where records are free-form
    (JSONL rows may each carry different keys, so a missing one is a row-level rejection)."""
    path = spec.source.path
    if not path.exists():
        if spec.spec_path.parent == BUNDLED_SPEC_DIR and os.environ.get("NLPCTR_DATA_ROOT"):
            raise UserError(
                f"source file {path} does not exist: NLPCTR_DATA_ROOT points at a folder without the "
                f"bundled {spec.name} files; point it at a complete copy, or unset it"
            )
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
