"""Row-level parsing and validation for ingest: pure Python, so it is unit-testable and fuzzable
without a pipeline. Each source record (a dict of source columns, or a malformed marker from
`source_files`) becomes either a canonical impression row or a `Rejection` with a reason code;
nothing is dropped silently.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nlpctr.atomic import JsonObject
from nlpctr.config_files import is_integer, is_number
from nlpctr.models.schema import ImpressionRow, normalize_text, stable_hash, text_id
from nlpctr.pipelines.spec_rules import ColumnRule, NumericRule, TimestampRule
from nlpctr.pipelines.specs import DatasetSpec
from nlpctr.pipelines.text_repair import TEXT_TRANSFORMS

# Reason codes of dead-letter records (docs/USAGE.md documents each).
MALFORMED_RECORD = "malformed_record"
MISSING_TEXT = "missing_text"
MISSING_ID = "missing_id"
BAD_TIMESTAMP = "bad_timestamp"
CLICKS_GT_IMPRESSIONS = "clicks_gt_impressions"
BAD_COUNT = "bad_count"
BAD_LABEL = "bad_label"
ZERO_IMPRESSIONS = "zero_impressions"
BAD_ENCODING = "bad_encoding"
DUPLICATE_IMPRESSION_ID = "duplicate_impression_id"
TEXT_TOO_LONG = "text_too_long"
BAD_TYPE = "bad_type"
# Two different source values hashed (hash_of, text_id_of) to one id: the 64 bits collided.
ID_HASH_COLLISION = "id_hash_collision"
# A numeric feature's value is missing, not a number, not finite, too large, or negative under log1p.
BAD_NUMERIC = "bad_numeric"
REASONS = (
    MALFORMED_RECORD, MISSING_TEXT, MISSING_ID, BAD_TIMESTAMP, CLICKS_GT_IMPRESSIONS, BAD_COUNT,
    BAD_LABEL, ZERO_IMPRESSIONS, BAD_ENCODING, DUPLICATE_IMPRESSION_ID, TEXT_TOO_LONG, BAD_TYPE,
    ID_HASH_COLLISION, BAD_NUMERIC,
)  # fmt: skip

# Marks a source record that could not even be parsed into fields.
MALFORMED_KEY = "__malformed__"
RAW_KEY = "__raw__"
# Control characters other than tab and newlines are corruption in a text field.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# Lone surrogates: undecodable bytes kept by errors="surrogateescape" (source_files reads so).
SURROGATE = re.compile(r"[\ud800-\udfff]")
# Python refuses str() of integers beyond 4300 digits; anything this long is not a value.
_MAX_INT_BITS = 4096
_MAX_COUNT = 2**63 - 1  # impressions and clicks are int64 columns
# A numeric feature beyond this magnitude is a unit or parsing error (bytes for gigabytes, a
# timestamp in a price column), and its square overflows float32 once standardised.
MAX_NUMERIC = 1e15
_DECIMAL = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*")


class DeadLetter(TypedDict):
    """One line of `rejected/*.jsonl`: why a source record was rejected, and the record."""

    reason: str  # a reason code above
    message: str
    record: JsonObject  # the source record, made JSON-safe (`json_safe`)


@dataclass(frozen=True)
class Rejection:
    reason: str
    message: str
    record: JsonObject  # the source record as read, before validation

    def to_json(self) -> str:
        """The dead letter as one JSON line."""
        letter = DeadLetter(reason=self.reason, message=self.message, record=json_safe(self.record))
        return json.dumps(letter, sort_keys=True, ensure_ascii=True)


class _Invalid(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def json_safe(value: Any) -> Any:
    """Make a source record JSON-serialisable without losing what was wrong with it."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="backslashreplace")
    if isinstance(value, str):
        # Lone surrogates (from undecodable bytes) cannot be encoded; show them escaped.
        return value.encode("utf-8", errors="backslashreplace").decode("utf-8")
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if is_integer(value) and value.bit_length() > _MAX_INT_BITS:
        return f"<integer of {value.bit_length()} bits>"  # str() refuses it (digit limit)
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


def malformed(raw: str, message: str) -> JsonObject:
    """A source record that could not be split into fields (undecodable bytes in its text are
    escaped: a lone surrogate cannot cross a pipeline boundary)."""
    return {MALFORMED_KEY: message, RAW_KEY: json_safe(raw)}


# ---------------------------------------------------------------------------------- values


def as_text(value: Any) -> str | None:
    """A source value as a string; None when missing. Integral floats print as integers
    (CSV and pandas often turn an integer id column into floats)."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="surrogateescape")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise _Invalid(MALFORMED_RECORD, f"an integer of {value.bit_length()} bits is not a usable value")
    return str(value)


def _source_text(column: str, record: JsonObject) -> str | None:
    """A source column's value as text for an id, a text or a context column. A JSON object
    or list (or a parquet struct/list) is not text: printing it would invent a value."""
    value = record.get(column)
    if isinstance(value, dict | list | tuple | set | frozenset):
        kind = "an object" if isinstance(value, dict) else "a list"
        raise _Invalid(BAD_TYPE, f"{column} is {kind}, not a text, number or id")
    return as_text(value)


# Characters that show nothing on their own: format characters (zero-width space and joiners,
# bidi marks, soft hyphen, BOM), separators, combining marks with no base, and the blank
# fillers of Hangul and Braille. Other control characters are corruption (bad_encoding).
_INVISIBLE_CATEGORIES = frozenset({"Cf", "Zs", "Zl", "Zp", "Mn", "Me"})
_BLANK_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def _blank(value: str | None) -> bool:
    """True when a value is missing or has no visible character."""
    return value is None or all(
        c.isspace() or c in _BLANK_FILLERS or unicodedata.category(c) in _INVISIBLE_CATEGORIES for c in value
    )


def _hashable(column: str, value: str | None) -> str | None:
    """A source value that an id is hashed from: undecodable bytes would make the hash fail."""
    if value is not None and SURROGATE.search(value):
        raise _Invalid(BAD_ENCODING, f"{column} contains bytes that are not valid UTF-8")
    return value


def concat_id(parts: list[str]) -> str:
    """Values joined with ':', each with its ':' and '\\' escaped by a '\\', so different
    values never give one id (('1', '2:3') and ('1:2', '3') used to), and values with
    neither character (numbers, UUIDs) give the same id as a plain join."""
    return ":".join(p.replace("\\", "\\\\").replace(":", "\\:") for p in parts)


# stable_hash joins its parts with U+001F: a part holding one could give another's hash.
_HASH_SEPARATOR = "\x1f"


def _column_value(rule: ColumnRule, record: JsonObject) -> str | None:
    return _column_value_and_preimage(rule, record)[0]


def _column_value_and_preimage(rule: ColumnRule, record: JsonObject) -> tuple[str | None, str | None]:
    """A target column's value, and for a hashed one (hash_of, text_id_of) the exact string its
    hash was computed from (None otherwise): two pre-images under one id are a collision."""
    preimage = None
    if rule.column:
        value = _source_text(rule.column, record)
    elif rule.text_id_of:
        source = _hashable(rule.text_id_of, _source_text(rule.text_id_of, record))
        if source is None or _blank(source):
            value = None
        else:
            # text_id hashes the normalised form: spellings that normalise alike are one text.
            value, preimage = text_id(source), normalize_text(source)
    else:
        columns = rule.hash_of or rule.concat
        parts = [_hashable(c, _source_text(c, record)) for c in columns]
        if any(p is None or _blank(p) for p in parts):
            return None, None
        if rule.hash_of:
            bad = next((c for c, p in zip(columns, parts, strict=True) if _HASH_SEPARATOR in p), None)
            if bad is not None:
                raise _Invalid(BAD_ENCODING, f"{bad} contains control character U+001F")
            value = stable_hash(*parts)
            preimage = _HASH_SEPARATOR.join(parts)  # type: ignore[arg-type]  # what stable_hash hashes
        else:
            value = concat_id(parts)  # type: ignore[arg-type]
    for transform in rule.transforms if value is not None else ():
        value = TEXT_TRANSFORMS[transform](value)
    return value, preimage


def parse_count(value: Any, column: str) -> int:
    """A non-negative integer count; bad_count otherwise."""
    if isinstance(value, bool):
        raise _Invalid(BAD_COUNT, f"{column}={value!r} is not an integer count")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and (digits := re.fullmatch(r"\s*([+-]?)0*(\d+?)(?:\.0*)?\s*", value)):
        # Its digits, never float(): a long integral text is exact, and over int64 it is refused
        # below (int() of 4,300+ digits and float() of 309+ are Python errors, not values).
        sign, body = digits.groups()
        if len(body) > len(str(_MAX_COUNT)):
            raise _Invalid(
                BAD_COUNT, f"{column} has {len(body):,} digits: it does not fit the int64 count column"
            )
        number = int(sign + body)
    else:
        raise _Invalid(BAD_COUNT, f"{column}={json_safe(value)!r} is not an integer count")
    if number < 0:
        raise _Invalid(BAD_COUNT, f"{column}={number} is negative")
    if number > _MAX_COUNT:
        shown = number if number < 10**30 else f"<{len(str(number)):,} digits>"
        raise _Invalid(BAD_COUNT, f"{column}={shown} does not fit the int64 count column")
    return number


def parse_numeric(name: str, rule: NumericRule, record: JsonObject) -> float | None:
    """A numeric feature's value: a finite number (an int, a float, or a decimal string such as
    '1.5e3'), log1p'd when the rule says so; None for a missing value of an optional feature.
    bad_numeric otherwise, naming the column and what is wrong."""
    value = record.get(rule.column)
    where = f"numeric {name} (source column {rule.column!r})"
    if value is None or (isinstance(value, str) and not value.strip()):
        if rule.optional:
            return None
        raise _Invalid(BAD_NUMERIC, f"{where} is missing (mark the feature `optional: true` to allow that)")
    if not (is_number(value) or isinstance(value, str)):
        raise _Invalid(BAD_NUMERIC, f"{where}={json_safe(value)!r} is not a number")
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        raise _Invalid(BAD_NUMERIC, f"{where}={json_safe(value)!r} is not a number")
    if isinstance(value, int) and value.bit_length() > 64:
        raise _Invalid(
            BAD_NUMERIC, f"{where} is an integer of {value.bit_length()} bits, beyond ±{MAX_NUMERIC:g}"
        )
    number = float(value)
    if not math.isfinite(number):
        raise _Invalid(BAD_NUMERIC, f"{where}={value!r} is not finite")
    if abs(number) > MAX_NUMERIC:
        raise _Invalid(BAD_NUMERIC, f"{where}={number:g} is beyond ±{MAX_NUMERIC:g}; rescale the column")
    if rule.log1p:
        if number < 0:
            raise _Invalid(BAD_NUMERIC, f"{where}={number:g} is negative, so log1p does not apply")
        number = math.log1p(number)
    return number


_CLICKED = {"0": 0, "1": 1, "false": 0, "true": 1}


def parse_clicked(value: Any, column: str) -> int:
    text = as_text(value)
    key = text.strip().lower() if text is not None else None
    if key not in _CLICKED:
        raise _Invalid(BAD_LABEL, f"{column}={json_safe(value)!r} is not a 0/1 click")
    return _CLICKED[key]


def _zone(name: str) -> dt.tzinfo:
    if name.upper() == "UTC":
        return dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise _Invalid(BAD_TIMESTAMP, f"unknown timezone {name!r}") from None


def parse_timestamp(rule: TimestampRule, record: JsonObject) -> dt.datetime:
    """event_timestamp as an aware UTC datetime with microsecond precision."""
    try:
        if rule.format == "offset":
            base = dt.datetime.fromisoformat(str(rule.base))
            if base.tzinfo is None:
                base = base.replace(tzinfo=dt.UTC)
            seconds = 0.0
            for column, unit in rule.offsets:
                value = record.get(column)
                number = float(value) if not isinstance(value, bool) else math.nan
                if not math.isfinite(number):
                    raise ValueError(f"{column}={value!r}")
                seconds += number * unit
            stamp = base + dt.timedelta(seconds=seconds)
        else:
            value = record.get(str(rule.column))
            if value is None or (isinstance(value, str) and not value.strip()):
                raise ValueError("missing")
            stamp = _parse_one_timestamp(rule, value)
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=_zone(rule.timezone))
        stamp = stamp.astimezone(dt.UTC)  # overflows for year 1 or 9999 at an offset
    except _Invalid:
        raise
    # OSError: fromtimestamp() beyond the platform's time_t.
    except (ValueError, TypeError, OverflowError, OSError) as exc:
        column = rule.column or ",".join(c for c, _ in rule.offsets)
        raise _Invalid(BAD_TIMESTAMP, f"cannot parse {column} as {rule.format}: {exc}") from None
    if not 1970 <= stamp.year <= 2200:
        raise _Invalid(BAD_TIMESTAMP, f"timestamp {stamp.isoformat()} is outside 1970-2200")
    return stamp


def _parse_one_timestamp(rule: TimestampRule, value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    if rule.format == "iso8601":
        return dt.datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
    if rule.format == "iso_week":
        text = as_text(value) or ""
        if not re.fullmatch(r"\d{6}", text.strip()):
            raise ValueError(f"{value!r} is not YYYYWW")
        year, week = int(text[:4]), int(text[4:6])
        return dt.datetime.combine(dt.date.fromisocalendar(year, week, 1), dt.time(), tzinfo=dt.UTC)
    if rule.format == "year_week":
        text = as_text(value) or ""
        if not re.fullmatch(r"\d{6}", text.strip()):
            raise ValueError(f"{value!r} is not YYYYWW")
        # %W week 00 holds the days before the first Monday; its Monday lies in December before.
        return dt.datetime.strptime(f"{text.strip()}1", "%Y%W%w").replace(tzinfo=dt.UTC)
    if rule.format in ("epoch_s", "epoch_ms"):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{value!r} is not finite")
        divisor = 1000.0 if rule.format == "epoch_ms" else 1.0
        return dt.datetime.fromtimestamp(number / divisor, tz=dt.UTC)
    return dt.datetime.strptime(str(value).strip(), str(rule.pattern))


# ---------------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class Limits:
    """Per-run text policy: texts longer than max_text_chars are rejected, or truncated when
    truncate_long_text is set (and counted in the manifest)."""

    max_text_chars: int
    truncate_long_text: bool = False


@dataclass(frozen=True)
class Mapped:
    """A canonical row, the text columns it truncated, the source record it came from (a
    duplicate's dead letter holds the original row, not the mapped one), and, per id column
    built by a hash, the string hashed: (column, pre-image) pairs, for the collision check."""

    row: ImpressionRow
    truncated: tuple[str, ...]
    source: JsonObject | None = None
    hashed: tuple[tuple[str, str], ...] = ()


def _check_text(column: str, value: str, limits: Limits) -> tuple[str, bool]:
    if SURROGATE.search(value):
        raise _Invalid(BAD_ENCODING, f"{column} contains bytes that are not valid UTF-8")
    bad = _CONTROL.search(value)
    if bad:
        raise _Invalid(
            BAD_ENCODING,
            f"{column} contains control character U+{ord(bad.group()):04X} at offset {bad.start()}",
        )
    if len(value) > limits.max_text_chars:
        if not limits.truncate_long_text:
            raise _Invalid(
                TEXT_TOO_LONG,
                f"{column} has {len(value)} characters, limit {limits.max_text_chars} "
                "(raise max_text_chars or pass --truncate-long-text)",
            )
        return value[: limits.max_text_chars], True
    return value, False


def map_record(spec: DatasetSpec, record: JsonObject, limits: Limits) -> Mapped | Rejection:
    """Map one source record onto the canonical schema, or say why it cannot be."""
    if MALFORMED_KEY in record:
        reason = BAD_ENCODING if "UTF-8" in str(record[MALFORMED_KEY]) else MALFORMED_RECORD
        return Rejection(reason, str(record[MALFORMED_KEY]), {RAW_KEY: record.get(RAW_KEY)})
    try:
        return _map(spec, record, limits)
    except _Invalid as invalid:
        return Rejection(invalid.reason, invalid.message, record)


def _map(spec: DatasetSpec, record: JsonObject, limits: Limits) -> Mapped:
    row: ImpressionRow = {}  # filled field by field below
    truncated: list[str] = []
    preimages: dict[str, str | None] = {}
    for target in ("impression_id", "query_id", "ad_id"):
        rule = spec.columns.get(target)
        row[target], preimages[target] = _column_value_and_preimage(rule, record) if rule else (None, None)
    for target in ("query_text", "ad_text"):
        rule = spec.columns.get(target)
        value = _column_value(rule, record) if rule else None
        if value is not None:
            value = unicodedata.normalize("NFC", value).strip()
        if _blank(value):
            if target == "ad_text" or (target == "query_text" and rule is not None):
                source = rule.sources[0] if rule else target
                raise _Invalid(
                    MISSING_TEXT, f"{target} (source column {source!r}) is missing, empty or invisible"
                )
            row[target] = None
            continue
        value, was_cut = _check_text(target, value, limits)
        if was_cut:
            truncated.append(target)
        row[target] = value
    for target, rule in spec.context.items():
        value, preimages[target] = _column_value_and_preimage(rule, record)
        if value is None or _blank(value):
            row[target] = None
        else:
            row[target], _ = _check_text(target, value.strip(), Limits(max_text_chars=1000))
    for target in ("ad_id", "query_id", "impression_id"):
        if row[target] is not None and _blank(row[target]):
            row[target] = None
        elif row[target] is not None:
            row[target], _ = _check_text(target, row[target].strip(), Limits(max_text_chars=1000))
    if not row["ad_id"]:
        raise _Invalid(MISSING_ID, f"ad_id (from {', '.join(spec.columns['ad_id'].sources)}) is missing")
    if spec.columns.get("query_id") and not row["query_id"]:
        raise _Invalid(MISSING_ID, "query_id is missing")
    if not row["impression_id"]:
        if "impression_id" in spec.columns:
            raise _Invalid(MISSING_ID, "impression_id is missing")
        # No id in the source: the record's own content identifies it (exact duplicates collide).
        content = json.dumps(json_safe(record), sort_keys=True)
        row["impression_id"], preimages["impression_id"] = stable_hash(content), content

    row["event_timestamp"] = parse_timestamp(spec.timestamp, record)
    for name, numeric in spec.numeric.items():
        row[name] = parse_numeric(name, numeric, record)

    label = spec.label
    if label.form == "binary":
        row["impressions"] = 1
        row["clicks"] = parse_clicked(record.get(str(label.clicked)), str(label.clicked))
    else:
        impressions = parse_count(record.get(str(label.impressions)), str(label.impressions))
        clicks = parse_count(record.get(str(label.clicks)), str(label.clicks))
        if impressions == 0:
            raise _Invalid(ZERO_IMPRESSIONS, f"{label.impressions}=0: a row must have impressions >= 1")
        if clicks > impressions:
            raise _Invalid(
                CLICKS_GT_IMPRESSIONS, f"{label.clicks}={clicks} > {label.impressions}={impressions}"
            )
        row["impressions"], row["clicks"] = impressions, clicks

    row["query_text_id"] = text_id(row["query_text"]) if row["query_text"] else None
    row["ad_text_id"] = text_id(row["ad_text"])
    hashed = tuple((t, p) for t, p in preimages.items() if p is not None and row[t] is not None)
    return Mapped(row=row, truncated=tuple(truncated), source=record, hashed=hashed)
