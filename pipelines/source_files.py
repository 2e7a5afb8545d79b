"""Source files -> raw records: CSV/TSV (gzipped or not) and JSON lines, as dicts of source
columns. Pure Python, so it is unit-testable and fuzzable without a pipeline. What cannot be
split into fields becomes a malformed marker (`records.malformed`) that keeps its original
text, for its dead letter; `records.map_record` validates the rest.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from typing import Any

from nlpctr.atomic import JsonObject
from nlpctr.pipelines.records import SURROGATE, json_safe, malformed

# A JSON record nested deeper than this is malformed: the code that walks a record (json_safe, the
# dead letter's writer) recurses, and a step deep in a runner's stack would meet the recursion limit.
MAX_JSON_DEPTH = 32

# Python's csv module refuses a field over 131,072 characters. The whole file is in memory
# already, so a long field is a long value (rejected as text_too_long, or truncated under
# --truncate-long-text, with the original row kept), not a broken file. 2**31 - 1 fits a C long
# everywhere.
FIELD_SIZE_LIMIT = 2**31 - 1
csv.field_size_limit(max(csv.field_size_limit(), FIELD_SIZE_LIMIT))


class _RecordedLines:
    """The lines of a text, remembering those a csv.reader took since the last `take()`: the
    original text of a record, for a dead letter when the record cannot be parsed."""

    def __init__(self, text: str) -> None:
        self._lines = io.StringIO(text, newline="")
        self._taken: list[str] = []

    def __iter__(self) -> _RecordedLines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self._taken.append(line)
        return line

    def drop(self) -> None:
        self._taken.clear()

    def take(self) -> str:
        raw = "".join(self._taken)
        self._taken.clear()
        for ending in ("\r\n", "\n", "\r"):
            if raw.endswith(ending):
                return raw[: -len(ending)]
        return raw


GZIP_MAGIC = b"\x1f\x8b"
# Other compressed files, known by their first bytes, so they are refused in one line instead
# of being read as text (a column list of binary bytes).
_COMPRESSED = (
    (re.compile(rb"BZh[1-9]1AY&SY", re.DOTALL), "bzip2"),
    (re.compile(rb"\xfd7zXZ\x00"), "xz"),
    (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd"),
    (re.compile(rb"PK\x03\x04"), "zip"),
)


def compression_of(head: bytes) -> str | None:
    """'gzip' or the name of another compression a file's first bytes show; None for a plain
    file. By content, not by name: a plain file named .gz is plain."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    return next((name for magic, name in _COMPRESSED if magic.match(head)), None)


def parse_delimited(data: bytes, delimiter: str, source: str) -> Iterator[JsonObject]:
    """Records of a CSV/TSV file with a header row, gzipped or not. Undecodable bytes survive
    as surrogates so the row carrying them is rejected as bad_encoding instead of failing the
    whole file. A row that cannot be parsed becomes a malformed marker that keeps its original
    text."""
    if data.startswith(GZIP_MAGIC):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:  # ingest checks the file before it runs
            yield malformed("", f"{source}: damaged gzip data: {exc}")
            return
    # utf-8-sig: Excel's "CSV UTF-8" starts with a byte order mark, which is not part of the
    # first column's name.
    text = data.decode("utf-8-sig", errors="surrogateescape")
    lines = _RecordedLines(text)
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader)
        while not header:  # blank lines before the header
            header = next(reader)
    except StopIteration:
        return
    except csv.Error as exc:
        yield malformed(lines.take(), f"{source}: unreadable header: {exc}")
        return
    lines.drop()
    width = len(header)
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield malformed(lines.take(), f"{source} line {reader.line_num}: {exc}")
            continue
        if len(fields) != width:
            if not fields:  # a blank line is not a record
                lines.drop()
                continue
            message = f"{source} line {reader.line_num}: {len(fields)} fields, header has {width}"
            yield malformed(lines.take(), message)
            continue
        lines.drop()
        record = dict(zip(header, fields, strict=True))
        # Lone surrogates cannot cross a pipeline boundary, so the row becomes its dead letter here.
        bad = next((k for k, v in record.items() if SURROGATE.search(v)), None)
        if bad is not None:
            yield malformed(
                json.dumps(json_safe(record), sort_keys=True),
                f"{source} line {reader.line_num}: invalid UTF-8 in column {bad!r}",
            )
            continue
        yield record


def _open_text(path: str) -> Any:
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == GZIP_MAGIC
    opener = gzip.open if gzipped else open
    return opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")


def delimited_head(path: str, delimiter: str) -> tuple[list[str], bool]:
    """The header row of a CSV/TSV file, gzipped or not, and whether any row follows it."""
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next((fields for fields in reader if fields), [])  # blank lines before it
        return header, any(fields for fields in reader)


def has_lines(path: str) -> bool:
    """Whether a line-based file, gzipped or not, holds anything but blank lines."""
    with _open_text(path) as handle:
        return any(line.strip() for line in handle)


def parse_json_line(line: bytes | str) -> JsonObject | None:
    """One JSONL record; None for a blank line, a malformed marker for anything unparseable.
    A byte order mark (a file saved as "UTF-8 with BOM") is not part of the record."""
    if isinstance(line, bytes):
        line = line.removeprefix(b"\xef\xbb\xbf")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            return malformed(line.decode("utf-8", errors="backslashreplace"), f"invalid UTF-8: {exc}")
    line = line.removeprefix("\ufeff")
    if not line.strip():
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        return malformed(line, f"not JSON: {exc.msg} at column {exc.colno}")
    except ValueError:  # an integer of more than 4,300 digits (Python's limit for int())
        return malformed(line, "a number in it has more than 4,300 digits: not a usable value")
    except RecursionError:
        return malformed(line, f"nested deeper than {MAX_JSON_DEPTH} levels")
    if not isinstance(value, dict):
        return malformed(line, f"expected a JSON object, got {type(value).__name__}")
    if _depth(value) > MAX_JSON_DEPTH:  # code that walks a record recurses: bounded here, once
        return malformed(line, f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _depth(value: Any) -> int:
    """How deeply a parsed JSON value nests (iteratively: no recursion limit to meet)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth <= MAX_JSON_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                stack.extend((child, depth + 1) for child in children)
    return deepest
