"""The canonical impression schema (DESIGN.md) and the text identity used everywhere.

Shared by the Beam jobs, the Feast definitions and the trainers; pure pyarrow, no Beam,
no torch, so any layer can import it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import unicodedata
from collections.abc import Iterable
from typing import TypedDict

import pyarrow as pa

SPLITS = ("train", "valid", "test")

# Columns every prepared dataset has, in this order; dataset-specific categorical context
# columns (test_id, position, ...) follow them as nullable strings, then its numeric features
# as float64, then the derived ones.
CORE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("impression_id", pa.string(), nullable=False),
    pa.field("event_timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("query_id", pa.string()),
    pa.field("query_text", pa.string()),
    pa.field("ad_id", pa.string(), nullable=False),
    pa.field("ad_text", pa.string(), nullable=False),
)
LABEL_FIELDS: tuple[pa.Field, ...] = (
    pa.field("impressions", pa.int64(), nullable=False),
    pa.field("clicks", pa.int64(), nullable=False),
)
# Derived by ingest: text identities (the embedding job deduplicates on them) and the split.
DERIVED_FIELDS: tuple[pa.Field, ...] = (
    pa.field("query_text_id", pa.string()),
    pa.field("ad_text_id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
)


class _ImpressionFields(TypedDict):
    impression_id: str
    event_timestamp: dt.datetime
    query_id: str | None
    query_text: str | None
    ad_id: str
    ad_text: str
    impressions: int
    clicks: int
    query_text_id: str | None
    ad_text_id: str


# (A total=False subclass, not NotRequired: under postponed annotations Python 3.11 cannot see it.)
class ImpressionRow(_ImpressionFields, total=False):
    """One row of `impressions/` as the Beam jobs carry it: the fields above (tests/test_records.py
    keeps the two equal). The dataset's context (str | None) and numeric (float | None) columns
    ride beside them under their own names; `split` is set once the row is assigned one."""

    split: str


CORE_COLUMNS: tuple[str, ...] = tuple(f.name for f in CORE_FIELDS + LABEL_FIELDS)
RESERVED_COLUMNS: frozenset[str] = frozenset(f.name for f in CORE_FIELDS + LABEL_FIELDS + DERIVED_FIELDS)


def impression_schema(context_columns: Iterable[str], numeric_columns: Iterable[str] = ()) -> pa.Schema:
    """The pyarrow schema of `impressions/` for a dataset with these context columns and
    numeric features (null only where the spec marks a feature optional)."""
    context = [pa.field(name, pa.string()) for name in context_columns]
    numeric = [pa.field(name, pa.float64()) for name in numeric_columns]
    return pa.schema([*CORE_FIELDS, *context, *numeric, *LABEL_FIELDS, *DERIVED_FIELDS])


def normalize_text(text: str) -> str:
    """The form a text is identified by: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_id(text: str) -> str:
    """Identity of a text: 16 hex digits of sha1 over its normalised form.

    Two spellings that differ only in case or spacing share one id, so the embedding job
    encodes them once.
    """
    return hashlib.sha1(normalize_text(text).encode("utf-8")).hexdigest()[:16]


def stable_hash(*parts: object) -> str:
    """A short deterministic id from several values (e.g. ad_id = hash(headline, test))."""
    joined = "\x1f".join("" if p is None else str(p) for p in parts)
    return hashlib.sha1(joined.encode("utf-8")).hexdigest()[:16]


def unit_interval(*parts: object) -> float:
    """A deterministic pseudo-uniform number in [0, 1) from values; used for seeded splits."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
