"""Ingest's reading side: a dataset spec's source file or shards -> raw records (Beam), and the
checks on the files themselves (exist, are readable, are not compressed some unreadable way,
are of one format, have the columns the spec names) that run before any pipeline, so each
fails in one line.

Used by `pipelines/ingest.py`; rows are parsed by `source_files` or `ubi` and validated by
`records.map_record`. Shards: docs/USAGE.md, "Sharded sources"; docs/DESIGN.md, "Modules in
detail", ingest_source.py.
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
        self.files = source_files(spec)

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.pvalue.PCollection]:
        spec = self.spec
        if spec.source.format == "ubi_ndjson":
            return self._read_lines(pbegin) | "JoinUbiEvents" >> JoinUbiEvents()
        if spec.source.format == "jsonl":
            records = (
                self._read_lines(pbegin)
                | "ParseJson" >> beam.Map(parse_json_line)
                | "SkipBlank" >> beam.Filter(lambda r: r is not None)
            )
        elif spec.source.format == "parquet":
            records = pbegin | "ReadRecords" >> self._read_parquet()
        else:
            records = pbegin | "ReadRecords" >> self._read_delimited()
        return {"records": records, "stats": pbegin | "NoSourceStats" >> beam.Create([])}

    def _patterns(self, files: list[Path] | None = None) -> list[str]:
        return [literal_pattern(f) for f in (self.files if files is None else files)]

    def _read_parquet(self) -> beam.PTransform:
        if len(self.files) == 1:
            return beam.io.ReadFromParquet(self._patterns()[0])
        return "Shards" >> beam.Create(self._patterns()) | "ReadShards" >> beam.io.ReadAllFromParquet()

    def _read_delimited(self) -> beam.PTransform:
        # Whole files, not lines: quoted fields may hold newlines. The bytes as they are
        # (parse_delimited unzips gzip by content; Beam would go by the name, and its
        # decompressing reader returns only the first 16 MiB to a plain read()).
        return (
            "Files" >> beam.Create(self._patterns())
            | "MatchFiles" >> fileio.MatchAll()
            | "ReadMatches" >> fileio.ReadMatches(compression=CompressionTypes.UNCOMPRESSED)
            | "ParseDelimited"
            >> beam.FlatMap(
                lambda f, d: parse_delimited(f.read(), d, os.path.basename(f.metadata.path)),
                self.spec.source.delimiter,
            )
        )

    def _read_lines(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.PCollection:
        """Every line of the files as bytes; each file read by its content's compression."""
        coder = beam.coders.BytesCoder()
        if len(self.files) == 1:
            path = self.files[0]
            return pbegin | "ReadLines" >> beam.io.ReadFromText(
                literal_pattern(path), coder=coder, compression_type=text_compression(path)
            )
        by_compression: dict[str, list[Path]] = {}
        for path in self.files:
            by_compression.setdefault(text_compression(path), []).append(path)
        parts = [
            pbegin
            | f"Shards{kind}" >> beam.Create(self._patterns(files))
            | f"ReadLines{kind}" >> beam.io.ReadAllFromText(coder=coder, compression_type=kind)
            for kind, files in sorted(by_compression.items())
        ]
        return parts | "AllLines" >> beam.Flatten()


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


def _visible(path: Path, root: Path) -> bool:
    """Not a hidden file, nor a writer's marker or metadata (`_SUCCESS`, `_metadata`)."""
    return not any(part.startswith((".", "_")) for part in path.relative_to(root).parts)


def source_files(spec: DatasetSpec) -> list[Path]:
    """The files a spec's source names, sorted; a UserError (one line) when a folder is missing
    or empty, a glob matches nothing, a listed shard is missing, or the shards mix formats."""
    source, name = spec.source, spec.spec_path.name
    if source.path is not None:
        return [source.path]
    if source.folder is not None:
        folder = source.folder
        if not folder.is_dir():
            what = "does not exist" if not folder.exists() else "is not a folder"
            raise UserError(f"source.folder {folder} {what}; fix source.folder in {name}")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and _visible(p, folder))
        if not files:
            raise UserError(f"source.folder {folder} holds no files; fix source.folder in {name}")
    elif source.glob is not None:
        matched = glob.glob(source.glob, root_dir=source.base, recursive=True)
        files = sorted({(source.base / m).resolve() for m in matched if (source.base / m).is_file()})
        if not files:
            raise UserError(
                f"source.glob {source.glob!r} matches no file under {source.base}; fix the pattern in {name}"
            )
    else:
        files = list(source.shards)
        missing = next((p for p in files if not p.is_file()), None)
        if missing is not None:
            what = "does not exist" if not missing.exists() else "is not a file"
            raise UserError(f"source.shards: {missing} {what}; fix the list in {name}")
    _check_one_format(spec, files)
    return files


PARQUET_MAGIC = b"PAR1"


def _check_one_format(spec: DatasetSpec, files: list[Path]) -> None:
    """Shards hold one format, the spec's: parquet shards all parquet, text shards none parquet
    and one file type (.csv and .jsonl side by side are two logs, not one)."""
    field, name = spec.source.field, spec.spec_path.name
    parquet = spec.source.format == "parquet"
    for path in files:
        try:
            is_parquet = first_bytes(path, 4) == PARQUET_MAGIC
        except OSError as exc:
            raise UserError(
                f"{field}: {path} cannot be read ({exc.strerror}); check its permissions"
            ) from None
        if is_parquet != parquet:
            kind = "parquet" if is_parquet else "not parquet"
            raise UserError(
                f"{field}: mixed formats: {path.name} is {kind} but source.format is "
                f"{spec.source.format}; keep one format per source or fix source.format in {name}"
            )
    suffixes = sorted({p.name.removesuffix(".gz").rpartition(".")[2].lower() for p in files if "." in p.name})
    if not parquet and len(suffixes) > 1:
        raise UserError(
            f"{field}: mixed formats (.{' and .'.join(suffixes[:2])} files); a source reads one "
            f"format: narrow {field} in {name}"
        )


def check_source(spec: DatasetSpec) -> list[Path]:
    """Before any pipeline: the source's files resolved, each readable and holding the columns
    the spec reads; returns them. A single file must hold rows; of shards, at least one must."""
    files = source_files(spec)
    if len(files) == 1 and spec.source.path is not None:
        available = source_columns(spec)
        if available is not None:
            spec.check_source_columns(available)
        return files
    with_rows = 0
    for path in files:
        available, has_rows = _file_columns(spec, path)
        with_rows += has_rows
        if available is not None and (has_rows or spec.source.format == "parquet"):
            spec.check_source_columns(available, file=path.name)
    if not with_rows:
        raise UserError(
            f"the {len(files)} files of {spec.source.field} hold no rows; "
            "point it at a log that holds records"
        )
    return files


def source_columns(spec: DatasetSpec) -> list[str] | None:
    """The columns a single-file source offers, read from its header; None where records are
    free-form (JSONL rows may each carry different keys, so a missing one is a row-level
    rejection)."""
    path = spec.source.path if spec.source.path is not None else source_files(spec)[0]
    if not path.exists():
        if spec.spec_path.parent == BUNDLED_SPEC_DIR and os.environ.get("NLPCTR_DATA_ROOT"):
            raise UserError(
                f"source file {path} does not exist: NLPCTR_DATA_ROOT points at a folder without the "
                f"bundled {spec.name} files; point it at a complete copy, or unset it"
            )
        raise UserError(f"source file {path} does not exist; fix source.path in {spec.spec_path.name}")
    if not path.is_file():
        raise UserError(
            f"source {path} is not a file; point source.path in {spec.spec_path.name} at one file, "
            "or name a folder of shards with source.folder"
        )
    available, has_rows = _file_columns(spec, path)
    if not has_rows:
        raise UserError(_no_rows(spec, path, available))
    return available


def _no_rows(spec: DatasetSpec, path: Path, header: list[str] | None) -> str:
    fix = f"point {spec.source.field} in {spec.spec_path.name} at a log that holds records"
    if spec.source.format == "csv":
        if not header:
            return f"source {path.name} is empty (no header row); {fix}"
        return f"source {path.name} has a header row but no rows; {fix}"
    if spec.source.format == "parquet":
        return f"source {path.name} has no rows; {fix}"
    return f"source {path.name} is empty; {fix}"


def _file_columns(spec: DatasetSpec, path: Path) -> tuple[list[str] | None, bool]:
    """One file's columns (None where records are free-form) and whether it holds any row."""
    try:
        if spec.source.format != "parquet":
            check_compression(path, spec.spec_path.name)
        if spec.source.format == "parquet":
            return list(pq.read_schema(path).names), pq.read_metadata(path).num_rows > 0
        if spec.source.format == "csv":
            header, has_rows = delimited_head(str(path), spec.source.delimiter)
            return (header or None), has_rows
        has_rows = has_lines(str(path))
    except (OSError, ValueError, csv.Error) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"source {path.name} is not a readable {spec.source.format} file ({first}); "
            "fix source.format in the spec or the file"
        ) from None
    if spec.source.format == "ubi_ndjson":
        return ["search_id", "object_id", "user_query", "title", "position", "timestamp",
                "application", "session_id", "clicked"], has_rows  # fmt: skip
    return None, has_rows
