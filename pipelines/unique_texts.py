"""The unique texts of a prepared dataset (Beam): one element per text id, with the earliest
time the text was shown, for `embed_text` to encode once each.

A text id (`models/schema.py`) stands for one normalised text; texts of two different forms
under one id are a collision of its 64 bits (about 3% likely among 10^9 texts), reported as a
dead letter instead of being merged into one embedding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import apache_beam as beam
import pandas as pd
import pyarrow as pa

from nlpctr.models.schema import normalize_text

# (id column, text column) pairs of the canonical schema whose texts are embedded.
TEXT_COLUMN_PAIRS: tuple[tuple[str, str], ...] = (("query_text_id", "query_text"), ("ad_text_id", "ad_text"))
INPUT_COLUMNS: tuple[str, ...] = (*(c for pair in TEXT_COLUMN_PAIRS for c in pair), "event_timestamp")


class UniqueText(NamedTuple):
    """A unique text and the earliest time (microseconds since the epoch, UTC) it was shown."""

    first_seen_us: int
    text: str


class TextIdCollision(NamedTuple):
    """Two texts that normalise differently but share a text id: the 64-bit id collided."""

    text_id: str
    texts: tuple[str, str]

    def to_json(self) -> str:
        return json.dumps(
            {"reason": TEXT_ID_COLLISION, "text_id": self.text_id, "texts": list(self.texts)},
            ensure_ascii=True,
        )


TEXT_ID_COLLISION = "text_id_collision"


def texts_of_table(table: pa.Table) -> Iterator[tuple[str, UniqueText]]:
    """(text_id, UniqueText) for each distinct text in one chunk of impressions: one per text
    id, or more when texts of different normalised forms share the id (a collision, which
    `EarliestSpelling` reports).

    Deduplicating inside the chunk first (earliest timestamp, then smallest spelling) keeps
    the shuffle small: a text shown a million times crosses it once per chunk, not per row.
    """
    ts = table.column("event_timestamp").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    frames = []
    for id_column, text_column in TEXT_COLUMN_PAIRS:
        frames.append(
            pd.DataFrame(
                {
                    "id": table.column(id_column).to_pandas(),
                    "text": table.column(text_column).to_pandas(),
                    "ts": ts.to_pandas(),
                }
            )
        )
    frame = pd.concat(frames, ignore_index=True).dropna(subset=["id", "text"])
    # min over (ts, text) per id is the same rule EarliestSpelling applies across chunks, so
    # the representative spelling does not depend on how the input was split.
    frame = frame.sort_values(["id", "ts", "text"], kind="stable").drop_duplicates(["id", "text"])
    # Spellings that normalise alike are one text (the earliest stays); a second normalised
    # form under the same id stays too, so the collision is seen, not merged.
    forms = frame["text"].map(normalize_text)
    frame = frame[~pd.DataFrame({"id": frame["id"], "form": forms}).duplicated()]
    for text_id, text, first_seen in zip(frame["id"], frame["text"], frame["ts"], strict=True):
        yield str(text_id), UniqueText(int(first_seen), str(text))


# The accumulator: the earliest sighting, its normalised form, and a text of another form (a
# collision) or None.
_Spelling = tuple[UniqueText | None, str | None, str | None]


class EarliestSpelling(beam.CombineFn):
    """The sightings of one text id -> (the earliest, min of (first_seen_us, text), and a text
    of another normalised form or None).

    A text id stands for one normalised text (`models/schema.py`); two forms under one id are a
    collision of its 64 bits, reported rather than merged into one embedding.
    """

    def create_accumulator(self) -> _Spelling:
        return None, None, None

    def add_input(self, acc: _Spelling, sighting: UniqueText) -> _Spelling:
        return self._merge(acc, (sighting, normalize_text(sighting.text), None))

    def merge_accumulators(self, accs: Iterable[_Spelling]) -> _Spelling:
        merged = self.create_accumulator()
        for acc in accs:
            merged = self._merge(merged, acc)
        return merged

    def extract_output(self, acc: _Spelling) -> tuple[UniqueText | None, str | None]:
        return acc[0], acc[2]

    @staticmethod
    def _merge(a: _Spelling, b: _Spelling) -> _Spelling:
        if a[0] is None:
            return b
        if b[0] is None:
            return a
        earliest, later = (a, b) if a[0] <= b[0] else (b, a)
        # A clash recorded on either side differs from both (their forms agree) when they agree.
        clash = later[0].text if a[1] != b[1] else (a[2] or b[2])
        return earliest[0], earliest[1], clash


class UniqueTexts(beam.PTransform):
    """Chunks of impressions (arrow tables) -> {"texts": one (text_id, UniqueText) per distinct
    text id, "collisions": a TextIdCollision per id that texts of different forms share (those
    ids are not embedded: either text would get the other's vector)}."""

    def expand(self, tables: beam.PCollection) -> dict[str, beam.PCollection]:
        found = (
            tables
            | "DistinctPerChunk" >> beam.FlatMap(texts_of_table)
            | "EarliestPerTextId" >> beam.CombinePerKey(EarliestSpelling())
        )
        texts, collided = found | "ByCollision" >> beam.Partition(lambda kv, _: int(kv[1][1] is not None), 2)
        return {
            "texts": texts | "Texts" >> beam.MapTuple(lambda text_id, best: (text_id, best[0])),
            "collisions": collided
            | "Collisions"
            >> beam.MapTuple(lambda text_id, best: TextIdCollision(text_id, (best[0].text, best[1]))),
        }


class ReadUniqueTexts(beam.PTransform):
    """impressions parquet -> `UniqueTexts`' {"texts", "collisions"}."""

    def __init__(self, file_pattern: str) -> None:
        super().__init__()
        self.file_pattern = file_pattern

    def expand(self, pbegin: beam.pvalue.PBegin) -> dict[str, beam.PCollection]:
        return (
            pbegin
            | "ReadImpressions"
            >> beam.io.ReadFromParquetBatched(self.file_pattern, columns=list(INPUT_COLUMNS))
            | "UniqueTexts" >> UniqueTexts()
        )
