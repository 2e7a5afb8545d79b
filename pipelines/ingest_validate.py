"""Ingest's row side (Beam): map each raw record onto the impression schema or a dead letter,
deduplicate impression ids, and assign train/valid/test splits.

Memory stays flat as the log grows: a first pass finds the impression ids that occur more
than once (64-bit hashes in a combiner, `FindRepeatedIds`); only rows of those ids go through
a shuffle to be deduplicated (`ValidateImpressions`), every other row streams to the sink.

The same first pass finds the ids built by a hash (`hash_of`, `text_id_of`) that two different
source values share (`FindIdHashCollisions`, again a combiner of compact arrays, no shuffle):
the rows of such an id become `id_hash_collision` dead letters instead of merging two ads (or
queries) into one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

import apache_beam as beam
import numpy as np

from nlpctr.atomic import JsonObject
from nlpctr.models.schema import SPLITS, ImpressionRow, unit_interval
from nlpctr.pipelines.records import (
    DUPLICATE_IMPRESSION_ID,
    ID_HASH_COLLISION,
    Limits,
    Mapped,
    Rejection,
    json_safe,
    map_record,
)
from nlpctr.pipelines.specs import DatasetSpec


class MapToSchema(beam.DoFn):
    """Raw record -> canonical row (main output) or Rejection (`rejected` output). A row with an
    id in `collided` (the side input of `FindIdHashCollisions`) is an `id_hash_collision`."""

    REJECTED = "rejected"  # the output tag; the folder the rejections land in is layout.REJECTED

    def __init__(self, spec: DatasetSpec, limits: Limits) -> None:
        self.spec = spec
        self.limits = limits

    def process(self, record: JsonObject, collided: frozenset[tuple[str, int]]) -> Iterator[Any]:
        result = map_record(self.spec, record, self.limits)
        if isinstance(result, Rejection):
            yield beam.pvalue.TaggedOutput(self.REJECTED, result)
            return
        clash = (
            next((c for c, _ in result.hashed if (c, id_key(result.row[c])) in collided), None)
            if collided  # empty as a rule: no key is computed
            else None
        )
        if clash is None:
            yield result
            return
        rule = self.spec.columns.get(clash) or self.spec.context.get(clash)
        # No rule: an impression_id hashed from the whole record (the spec names none).
        sources = ", ".join(rule.sources) if rule else "the whole record"
        yield beam.pvalue.TaggedOutput(
            self.REJECTED,
            Rejection(
                ID_HASH_COLLISION,
                f"{clash} {result.row[clash]!r} is the hash of two different source values "
                f"(of {sources}): its 64 bits collided, so its rows are not merged",
                record,
            ),
        )


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


def source_digest(preimage: str) -> int:
    """A 64-bit digest of the string an id was hashed from, independent of the id's own hash
    (blake2b vs sha1), so one id with two digests means two different sources."""
    digest = hashlib.blake2b(preimage.encode("utf-8"), digest_size=8, person=b"nlpctr-source")
    return int.from_bytes(digest.digest(), "little")


_HEX64 = re.compile(r"[0-9a-f]{16}")


def id_key(value: str) -> int:
    """A hashed id as the 64-bit number its 16 hex digits spell (stable_hash and text_id write
    ids so), which keys the check on the exact id; anything else by its blake2b digest."""
    if _HEX64.fullmatch(value):
        return int(value, 16)
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest(), "little")


def hashed_id_sources(mapped: Mapped) -> list[tuple[str, int, int]]:
    """(column, id key, source digest) for each id of a row that was built by a hash."""
    return [(column, id_key(mapped.row[column]), source_digest(pre)) for column, pre in mapped.hashed]


# Per column: the distinct (id key, source digest) pairs as an (n, 2) uint64 array, and the
# pairs not yet compacted into it.
_Sources = dict[str, tuple[np.ndarray, list[tuple[int, int]]]]


class CollidedIds(beam.CombineFn):
    """(column, id key, source digest) -> the frozenset of (column, id key) seen with two
    different source digests: ids that two different source values hashed to.

    Keyed by (column, id) inside the accumulator, not by a shuffle: the distinct pairs sit in
    compact numpy arrays (16 bytes per distinct id and source), like `RepeatedIdHashes`, so
    the check adds no GroupByKey over every row to a job that runs on every demo and test."""

    COMPACT_EVERY = 1 << 18

    def create_accumulator(self) -> _Sources:
        return {}

    def add_input(self, acc: _Sources, element: tuple[str, int, int]) -> _Sources:
        column, key, digest = element
        entry = acc.setdefault(column, (np.empty((0, 2), np.uint64), []))
        entry[1].append((key, digest))
        if len(entry[1]) >= self.COMPACT_EVERY:
            acc[column] = self._distinct([entry])
        return acc

    @staticmethod
    def _distinct(entries: list[tuple[np.ndarray, list[tuple[int, int]]]]) -> tuple[np.ndarray, list]:
        arrays = [
            a for pairs, pending in entries for a in (pairs, np.array(pending, np.uint64).reshape(-1, 2))
        ]
        return np.unique(np.concatenate(arrays), axis=0), []

    def merge_accumulators(self, accs: Iterable[_Sources]) -> _Sources:
        by_column: dict[str, list[tuple[np.ndarray, list[tuple[int, int]]]]] = {}
        for acc in accs:
            for column, entry in acc.items():
                by_column.setdefault(column, []).append(entry)
        return {column: self._distinct(entries) for column, entries in by_column.items()}

    def extract_output(self, acc: _Sources) -> frozenset[tuple[str, int]]:
        collided = set()
        for column, entry in acc.items():
            pairs = self._distinct([entry])[0]
            keys, counts = np.unique(pairs[:, 0], return_counts=True)  # distinct sources per id
            collided.update((column, int(k)) for k in keys[counts > 1])
        return frozenset(collided)


class FindIdHashCollisions(beam.PTransform):
    """Valid rows (`Mapped`) -> a singleton: the frozenset of (column, `id_key`) of the ids built
    by a hash (hash_of, text_id_of, a content-hashed impression_id) that two different source
    values share; empty as a rule."""

    def expand(self, mapped: beam.pvalue.PCollection) -> beam.pvalue.PCollection:
        return (
            mapped
            | "Sources" >> beam.FlatMap(hashed_id_sources)
            | "Collided" >> beam.CombineGlobally(CollidedIds())
        )


class FindRepeatedIds(beam.PTransform):
    """A first pass over the valid rows: which impression ids may occur more than once
    (their 64-bit hashes; a rare collision only sends a unique row through the exact
    deduplication), their timestamps (for the time split's cut points), and the hashed ids
    that two source values share ("collided", from `FindIdHashCollisions`)."""

    def __init__(self, spec: DatasetSpec, limits: Limits) -> None:
        super().__init__()
        self.spec = spec
        self.limits = limits

    def expand(self, records: beam.pvalue.PCollection) -> dict[str, beam.pvalue.PCollection]:
        spec, limits = self.spec, self.limits

        def valid_rows(record: JsonObject) -> list[Mapped]:
            result = map_record(spec, record, limits)
            return [] if isinstance(result, Rejection) else [result]

        mapped = records | "ValidRows" >> beam.FlatMap(valid_rows)
        repeated = (
            mapped
            | "IdHashes" >> beam.Map(lambda m: id_hash(m.row["impression_id"]))
            | "Repeated" >> beam.CombineGlobally(RepeatedIdHashes())
        )
        timestamps = mapped | "Timestamps" >> beam.Map(lambda m: m.row["event_timestamp"])
        collided = mapped | "IdHashCollisions" >> FindIdHashCollisions()
        return {"repeated": repeated, "timestamps": timestamps, "collided": collided}


def truncated_counts(mapped: Mapped) -> list[tuple[str, int]]:
    """Counter pairs of the text columns a row had cut (under --truncate-long-text)."""
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
    grow with the log on runners that hold a shuffle in memory (the DirectRunner). Rows with
    a hashed id in `collided` (also from `FindRepeatedIds`) are rejected before that.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        limits: Limits,
        repeated: beam.pvalue.PCollection,
        collided: beam.pvalue.PCollection,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.limits = limits
        self.repeated = repeated
        self.collided = collided

    def expand(self, records: beam.pvalue.PCollection) -> tuple[Any, Any, Any]:
        mapped = records | "Map" >> beam.ParDo(
            MapToSchema(self.spec, self.limits), beam.pvalue.AsSingleton(self.collided)
        ).with_outputs(MapToSchema.REJECTED, main="rows")
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
            kept | f"CountTruncated{i}" >> beam.FlatMap(truncated_counts)
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

            def by_group(row: ImpressionRow) -> ImpressionRow:
                # A row with no group value is its own group.
                key = row.get(group) or f"row:{row['impression_id']}"
                return {**row, "split": split_of(unit_interval(seed, "group", key), fractions)}

            return rows | "SplitGroups" >> beam.Map(by_group)

        def by_time(row: ImpressionRow, cuts: tuple[dt.datetime, dt.datetime]) -> ImpressionRow:
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
