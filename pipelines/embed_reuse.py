"""Incremental embedding: reuse the vectors `nlpctr embed` already published for the same encoder.

Inside the embedding pipeline (`reuse_stored`), unique texts are joined by text id with the
stored vectors and spelling digests (`_spellings-*.tsv.gz`) and routed "reused" or "to encode";
the output equals a full run's. `find_stored` decides whether a folder can be reused at all.
Why spellings, and when reuse falls back to a full run: docs/DESIGN.md, "Modules in detail",
embed_reuse.py.
"""

from __future__ import annotations

import hashlib
import logging
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.pvalue import TaggedOutput

from nlpctr.atomic import JsonObject
from nlpctr.layout import EMBEDDINGS_MANIFEST, EmbeddingsManifest
from nlpctr.models.encoder import EncoderConfig
from nlpctr.pipelines.unique_texts import UniqueText
from nlpctr.prepared import damage, parquet_files

LOG = logging.getLogger(__name__)

SPELLINGS_PREFIX = "_spellings"
SPELLINGS_SUFFIX = ".tsv.gz"
# Counter names the job sums (beside embed_text's unique_texts, texts_encoded, rows_written).
TEXTS_REUSED = "texts_reused"
STORED_FILES_UNREADABLE = "stored_files_unreadable"
# Same id, but another first spelling now (or no spelling record read back): encoded again.
STORED_TEXTS_RESPELLED = "stored_texts_respelled"
STORED_TEXTS_GONE = "stored_texts_gone"  # no longer in the data (or now a collision): dropped
# The columns a stored file must have, with their types, to be read back (EMBEDDING_SCHEMA's).
STORED_COLUMNS = {
    "text_id": pa.string(),
    "embedding": pa.list_(pa.float32()),
    "encoder_version": pa.string(),
}


def spelling_digest(text: str) -> str:
    """16 hex digits of sha1 over the exact spelling the encoder read (not its normalised form)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class StoredEmbeddings:
    """A published embedding folder whose vectors a run of the same encoder may reuse."""

    folder: str
    parquet_files: tuple[str, ...]
    spelling_files: tuple[str, ...]
    encoder_version: str
    dim: int
    rows: int


class ReusedText(NamedTuple):
    """The `example` of a reused row: what WriteEmbeddings reads of a TokenizedText."""

    text_id: str
    first_seen_us: int


class ReusedVector(NamedTuple):
    """The `inference` of a reused row: what WriteEmbeddings reads of an Encoded."""

    vector: np.ndarray


def find_stored(out: Path, config: EncoderConfig) -> StoredEmbeddings | None:
    """The published folder `out` as reusable vectors of `config`'s encoder, or None (a full run).

    No folder: None, silently (a first run). A folder of another encoder version, or one that
    is damaged or incomplete: None, with one warning line naming why.

    Args:
        out: the job's output folder, DIR/embeddings/<slug>/.
        config: the encoder this run embeds with.

    Returns:
        What `reuse_stored` reads, or None when every text is to be encoded.
    """
    if not out.is_dir():
        return None
    try:
        return _check_stored(out, config)
    except _NotReusable as exc:
        LOG.warning("embed: not reusing %s (%s); embedding every text", out, exc)
        return None


class _NotReusable(Exception):
    """Why a published folder's vectors cannot be reused (the warning's reason)."""


def _check_stored(out: Path, config: EncoderConfig) -> StoredEmbeddings:
    manifest = EmbeddingsManifest.read(out)
    if manifest is None:
        raise _NotReusable(f"{EMBEDDINGS_MANIFEST} is missing, unreadable or not a JSON object")
    if manifest.slug != config.slug or manifest.encoder_version != config.version:
        raise _NotReusable(
            f"written by encoder {manifest.encoder_version!r}, this run's is {config.version!r}"
        )
    dim, rows = manifest.dim, manifest.rows
    if dim is None or dim != config.source.width or rows is None:
        shown = manifest.content.get("dim"), manifest.content.get("rows")
        raise _NotReusable(f"{EMBEDDINGS_MANIFEST} records no usable dim/rows ({shown[0]!r}, {shown[1]!r})")
    files = parquet_files(out)
    stored_rows = 0
    for file in files:
        why = damage(file)
        if why is not None:
            raise _NotReusable(f"{file.name} is unreadable: {why}")
        schema = pq.read_schema(file)
        wrong = [
            c for c, kind in STORED_COLUMNS.items() if c not in schema.names or schema.field(c).type != kind
        ]
        if wrong:
            raise _NotReusable(f"{file.name} lacks column(s) {', '.join(wrong)} of the embedding schema")
        stored_rows += pq.ParquetFile(file).metadata.num_rows
    if stored_rows != rows:
        raise _NotReusable(f"its parquet holds {stored_rows} rows, its manifest says {rows}")
    spellings = sorted(out.glob(f"{SPELLINGS_PREFIX}-*{SPELLINGS_SUFFIX}"))
    if not spellings:
        raise _NotReusable(f"no {SPELLINGS_PREFIX}-*{SPELLINGS_SUFFIX}: written before reuse existed")
    return StoredEmbeddings(
        folder=str(out),
        parquet_files=tuple(str(f) for f in files),
        spelling_files=tuple(str(f) for f in spellings),
        encoder_version=config.version,
        dim=dim,
        rows=rows,
    )


# ------------------------------------------------------------------------------- reading


class ReadStoredVectors(beam.DoFn):
    """A stored parquet file -> (text_id, float32 vector) per row of this encoder version.

    Rows of another encoder version or width are skipped (their texts get encoded). A file
    that fails while being read is a dead letter ("unreadable", its path): the rows read
    before the failure are valid, and the texts after it are simply encoded.
    """

    def __init__(self, encoder_version: str, dim: int) -> None:
        self.encoder_version = encoder_version
        self.dim = dim

    def process(self, path: str) -> Iterator[Any]:
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
                parquet = pq.ParquetFile(handle)
                for batch in parquet.iter_batches(columns=list(STORED_COLUMNS)):
                    yield from self._rows(batch)
        except (pa.ArrowException, OSError, ValueError, EOFError) as exc:
            yield TaggedOutput("unreadable", f"{path}: {exc}")

    def _rows(self, batch: pa.RecordBatch) -> Iterator[tuple[str, np.ndarray]]:
        ids, vectors, versions = batch.column(0), batch.column(1), batch.column(2)
        keep = pc.and_(
            pc.and_(pc.is_valid(ids), pc.equal(versions, self.encoder_version)),
            pc.equal(pc.list_value_length(vectors), self.dim),
        )
        keep = pc.fill_null(keep, False)
        ids, vectors = ids.filter(keep), vectors.filter(keep)
        values = pc.list_flatten(vectors)
        if values.null_count:
            raise ValueError("null values inside stored vectors")
        # Copies: each vector leaves the batch's buffer, which is reused for the next batch.
        matrix = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, self.dim)
        yield from zip(ids.to_pylist(), list(matrix), strict=True)


class ReadSpellings(beam.DoFn):
    """A `_spellings-*.tsv.gz` file -> (text_id, spelling digest); a damaged one is a dead letter."""

    def process(self, path: str) -> Iterator[Any]:
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.GZIP) as handle:
                for line in iter(handle.readline, b""):  # CompressedFile is not iterable
                    parts = line.decode("utf-8").rstrip("\n").split("\t")
                    if len(parts) == 2:
                        yield parts[0], parts[1]
        except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
            yield TaggedOutput("unreadable", f"{path}: {exc}")


class StoredJoin(TypedDict):
    """What `JoinStored` (a CoGroupByKey) gathers for one text id."""

    text: Iterable[UniqueText]  # the text in the data (none once it left it)
    vector: Iterable[np.ndarray]  # its stored vector, if any
    spelling: Iterable[str]  # the stored spelling's digest, if any


class RouteTexts(beam.DoFn):
    """CoGroupByKey of one text id -> the text to encode (main output), or its reused row
    ("reused"); counter pairs ("counts") for what was dropped or respelled."""

    def process(self, element: tuple[str, StoredJoin]) -> Iterator[Any]:
        text_id, grouped = element
        texts = list(grouped["text"])
        vectors = list(grouped["vector"])
        if not texts:  # stored only: the text left the data (or its id now collides)
            if vectors:
                yield TaggedOutput("counts", (STORED_TEXTS_GONE, 1))
            return
        unique: UniqueText = texts[0]
        if not vectors:
            yield text_id, unique
            return
        if set(grouped["spelling"]) != {spelling_digest(unique.text)}:
            yield TaggedOutput("counts", (STORED_TEXTS_RESPELLED, 1))
            yield text_id, unique
            return
        # The current first impression, as a full run would write it; the vector is the stored one.
        row = PredictionResult(ReusedText(text_id, unique.first_seen_us), ReusedVector(vectors[0]))
        yield TaggedOutput("reused", row)


# ------------------------------------------------------------------------------- the split


class ReuseSplit(NamedTuple):
    """What `reuse_stored` hands back to the job."""

    to_encode: beam.PCollection  # (text_id, UniqueText)
    reused: beam.PCollection | None  # PredictionResult(ReusedText, ReusedVector); None: full run
    counts: list[beam.PCollection]  # (name, number) pairs for WriteCounts


def reuse_stored(unique: beam.PCollection, staging: Path, stored: StoredEmbeddings | None) -> ReuseSplit:
    """Write this run's spelling digests to `staging`, and split the unique texts into those
    whose stored vector is reused and those to encode.

    Applied inside the job's composite transform (its labels nest there).

    Args:
        unique: (text_id, UniqueText), one per text id the job embeds.
        staging: the folder the job writes its output into.
        stored: the published vectors to reuse (`find_stored`), or None for a full run.

    Returns:
        The texts to encode, the reused rows (None for a full run) and their counts.
    """
    _ = (
        unique
        | "SpellingLines" >> beam.MapTuple(lambda text_id, text: f"{text_id}\t{spelling_digest(text.text)}")
        | "WriteSpellings"
        >> beam.io.WriteToText(
            str(staging / SPELLINGS_PREFIX),
            file_name_suffix=SPELLINGS_SUFFIX,
            compression_type=CompressionTypes.GZIP,
        )
    )
    if stored is None:
        return ReuseSplit(unique, None, [])
    pipeline = unique.pipeline
    vectors = (
        pipeline
        | "StoredVectorFiles" >> beam.Create(stored.parquet_files)
        | "SpreadVectorFiles" >> beam.Reshuffle()  # one file per worker, not all in one bundle
        | "ReadStoredVectors"
        >> beam.ParDo(ReadStoredVectors(stored.encoder_version, stored.dim)).with_outputs(
            "unreadable", main="rows"
        )
    )
    spellings = (
        pipeline
        | "StoredSpellingFiles" >> beam.Create(stored.spelling_files)
        | "ReadSpellings" >> beam.ParDo(ReadSpellings()).with_outputs("unreadable", main="rows")
    )
    routed = (
        {"text": unique, "vector": vectors.rows, "spelling": spellings.rows}
        | "JoinStored" >> beam.CoGroupByKey()
        | "Route" >> beam.ParDo(RouteTexts()).with_outputs("reused", "counts", main="to_encode")
    )
    unreadable = (vectors.unreadable, spellings.unreadable) | "Unreadable" >> beam.Flatten()
    counts = [
        routed.reused | "CountReused" >> beam.Map(lambda _: (TEXTS_REUSED, 1)),
        routed.counts,
        unreadable | "CountUnreadable" >> beam.Map(lambda _: (STORED_FILES_UNREADABLE, 1)),
    ]
    return ReuseSplit(routed.to_encode, routed.reused, counts)


def reuse_manifest(counts: dict[str, float], stored: StoredEmbeddings | None) -> JsonObject:
    """The manifest's record of what this run reused and encoded (and logs what it could not reuse).

    Args:
        counts: the sums the job's pipeline wrote.
        stored: the folder the run reused from, or None for a full run.

    Returns:
        Entries for `_manifest.json`: texts_encoded, texts_reused and, when reused, the counts
        of stored texts that were respelled, dropped or unreadable.
    """
    entry: JsonObject = {
        "texts_encoded": int(counts.get("texts_encoded", 0)),
        TEXTS_REUSED: int(counts.get(TEXTS_REUSED, 0)),
        "reused_from_previous_run": stored is not None,
    }
    if stored is not None:
        for name in (STORED_TEXTS_RESPELLED, STORED_TEXTS_GONE, STORED_FILES_UNREADABLE):
            entry[name] = int(counts.get(name, 0))
        if entry[STORED_FILES_UNREADABLE]:
            LOG.warning(
                "embed: %d stored file(s) of %s could not be read back; their texts were encoded again",
                entry[STORED_FILES_UNREADABLE],
                stored.folder,
            )
    return entry
