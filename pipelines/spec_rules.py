"""The sections of a dataset spec: one rule per section and the validator that builds it.

Columns, the timestamp, the label, numeric features and the source each have a frozen rule
dataclass and a function that checks the section's YAML mapping and returns the rule, failing
with one line that names the field (`spec_error`). pipelines/specs.py assembles them into a
DatasetSpec; pipelines/records.py applies the rules to each source row.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nlpctr.atomic import JsonObject
from nlpctr.config_files import is_number
from nlpctr.errors import UserError

FORMATS = ("parquet", "csv", "jsonl", "ubi_ndjson")
TIMESTAMP_FORMATS = ("iso8601", "iso_week", "year_week", "epoch_s", "epoch_ms", "strptime", "offset")
LABEL_FORMS = ("binary", "aggregated")
TRANSFORMS = ("strip_html", "fix_mojibake")
# How a source names its files: one literal file, or shards (a folder, a glob, a list).
SOURCE_LAYOUTS = ("path", "folder", "glob", "shards")


@dataclass(frozen=True)
class ColumnRule:
    """How one target column is built from source columns.

    Exactly one of: `column` (copy), `hash_of` (stable hash of several columns),
    `concat` (values joined with ':', a ':' or '\\' inside a value escaped with '\\'),
    `text_id_of` (hash of one column's normalised text).
    """

    column: str | None = None
    hash_of: tuple[str, ...] = ()
    concat: tuple[str, ...] = ()
    text_id_of: str | None = None
    transforms: tuple[str, ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        if self.column:
            return (self.column,)
        if self.text_id_of:
            return (self.text_id_of,)
        return self.hash_of or self.concat


@dataclass(frozen=True)
class TimestampRule:
    """How event_timestamp is parsed.

    iso8601 (naive values are read as `timezone`), iso_week (ISO YYYYWW -> Monday 00:00 UTC),
    year_week (strftime %Y%W, Monday-based, week 00 = the days before the year's first Monday),
    epoch_s / epoch_ms, strptime (with `pattern`), offset (base + sum(column * seconds)).
    """

    format: str
    column: str | None = None
    pattern: str | None = None
    timezone: str = "UTC"
    base: str | None = None
    offsets: tuple[tuple[str, float], ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        if self.format == "offset":
            return tuple(name for name, _ in self.offsets)
        return (self.column,) if self.column else ()


@dataclass(frozen=True)
class LabelRule:
    form: str
    clicked: str | None = None
    impressions: str | None = None
    clicks: str | None = None

    @property
    def sources(self) -> tuple[str, ...]:
        if self.form == "binary":
            return (self.clicked,) if self.clicked else ()
        return tuple(c for c in (self.impressions, self.clicks) if c)


@dataclass(frozen=True)
class NumericRule:
    """A numeric feature: a source column read as a finite number, optionally log1p'd.

    `optional`: a missing value is kept as null (the model reads the training mean) instead of
    rejecting the row."""

    column: str
    log1p: bool = False
    optional: bool = False


@dataclass(frozen=True)
class SourceRule:
    """Where the source log is: one literal file (`path`; glob characters in it are literal),
    or shards in their own field: every file under a `folder`, the files a `glob` pattern
    matches (relative to `base`, the spec's folder or the data root), or a list of `shards`."""

    format: str
    delimiter: str = ","
    path: Path | None = None
    folder: Path | None = None
    glob: str | None = None
    shards: tuple[Path, ...] = ()
    base: Path = Path("/")

    @property
    def layout(self) -> str:
        """path, folder, glob or shards: the field the spec named."""
        if self.path is not None:
            return "path"
        if self.folder is not None:
            return "folder"
        return "glob" if self.glob is not None else "shards"

    @property
    def field(self) -> str:
        """The spec field that names the source, for messages (`source.folder`)."""
        return f"source.{self.layout}"

    @property
    def location(self) -> str:
        """The source as the spec names it, absolute: the file, the folder, the pattern, or the
        first shard and how many more there are."""
        if self.path is not None:
            return str(self.path)
        if self.folder is not None:
            return str(self.folder)
        if self.glob is not None:
            return str(self.base / self.glob)
        more = f" (+{len(self.shards) - 1} more)" if len(self.shards) > 1 else ""
        return f"{self.shards[0]}{more}"

    @property
    def inputs(self) -> tuple[Path, ...]:
        """Paths a job must never write into or over: the file, the folder, the shards, or the
        folder a glob pattern starts in."""
        if self.path is not None:
            return (self.path,)
        if self.folder is not None:
            return (self.folder,)
        if self.glob is not None:
            fixed = []
            for part in Path(self.glob).parts:
                if any(c in part for c in "*?["):
                    break
                fixed.append(part)
            return ((self.base / Path(*fixed)).resolve() if fixed else self.base,)
        return self.shards


def finite_number(value: Any) -> bool:
    """A number (not a bool) that is finite."""
    return is_number(value) and math.isfinite(value)


def _known_zone(name: str) -> bool:
    if name.upper() == "UTC":
        return True
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def shown(value: Any, limit: int = 60) -> str:
    """A spec value in an error message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def spec_error(spec_path: Path, where: str, message: str) -> UserError:
    """The one-line error naming the spec file and the field (`where`, cut to 80 characters)."""
    where = where if len(where) <= 80 else where[:79] + "…"
    return UserError(f"spec {spec_path.name}: {where}: {message}")


def expect_keys(spec_path: Path, where: str, mapping: Any, allowed: set[str]) -> JsonObject:
    """`mapping` if it is a mapping with no key outside `allowed`; else the error naming the key."""
    if not isinstance(mapping, dict):
        raise spec_error(spec_path, where, f"expected a mapping, got {type(mapping).__name__}")
    unknown = sorted((set(mapping) - allowed), key=str)
    if unknown:
        raise spec_error(
            spec_path, where, f"unknown key {shown(unknown[0])}; allowed: {', '.join(sorted(allowed))}"
        )
    return mapping


def str_list(spec_path: Path, where: str, value: Any) -> tuple[str, ...]:
    """One column name or a non-empty list of them, as a tuple."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise spec_error(spec_path, where, "expected a column name or a non-empty list of column names")
    return tuple(value)


def column_rule(spec_path: Path, where: str, value: Any) -> ColumnRule:
    """A target column's rule: a source column's name, or a mapping naming exactly one way to build it."""
    if isinstance(value, str):
        return ColumnRule(column=value)
    mapping = expect_keys(spec_path, where, value, {"column", "hash_of", "concat", "text_id_of", "transform"})
    kinds = [k for k in ("column", "hash_of", "concat", "text_id_of") if k in mapping]
    if len(kinds) != 1:
        raise spec_error(spec_path, where, "give exactly one of column, hash_of, concat, text_id_of")
    transforms = (
        str_list(spec_path, f"{where}.transform", mapping["transform"]) if "transform" in mapping else ()
    )
    for transform in transforms:
        if transform not in TRANSFORMS:
            raise spec_error(
                spec_path, f"{where}.transform", f"{shown(transform)} is not one of {', '.join(TRANSFORMS)}"
            )
    kind = kinds[0]
    if kind in ("column", "text_id_of"):
        if not isinstance(mapping[kind], str):
            raise spec_error(spec_path, f"{where}.{kind}", "expected a column name")
        return ColumnRule(**{kind: mapping[kind]}, transforms=transforms)
    return ColumnRule(**{kind: str_list(spec_path, f"{where}.{kind}", mapping[kind])}, transforms=transforms)


def strptime_problem(pattern: str) -> str | None:
    """What is wrong with a strptime pattern (a bad directive such as %Q, a stray %), or None.
    Checked when the spec loads: otherwise every row would be rejected one by one."""
    if "%" not in pattern:
        return "it has no % directive"
    try:
        dt.datetime.strptime("", pattern)
    except ValueError as exc:
        message = str(exc)
        # The pattern compiled and the empty value did not match it: the pattern is fine.
        if message.startswith(("time data ", "unconverted data remains")):
            return None
        return message.splitlines()[0][:100] if message else "invalid"
    return None


def timestamp_rule(spec_path: Path, value: Any) -> TimestampRule:
    """The timestamp section: its format and what that format needs (a pattern is checked now)."""
    where = "timestamp"
    mapping = expect_keys(
        spec_path, where, value, {"column", "format", "pattern", "timezone", "base", "offsets"}
    )
    fmt = mapping.get("format")
    if fmt not in TIMESTAMP_FORMATS:
        raise spec_error(
            spec_path, f"{where}.format", f"{shown(fmt)} is not one of {', '.join(TIMESTAMP_FORMATS)}"
        )
    if fmt == "offset":
        offsets = mapping.get("offsets")
        if not isinstance(offsets, dict) or not offsets or "base" not in mapping:
            raise spec_error(spec_path, where, "format offset needs `base` and `offsets: {column: seconds}`")
        for name, seconds in offsets.items():
            if not isinstance(name, str):
                raise spec_error(spec_path, f"{where}.offsets", f"expected column names, got {shown(name)}")
            if not finite_number(seconds):
                raise spec_error(spec_path, f"{where}.offsets.{name}", "expected seconds as a finite number")
        base = str(mapping["base"])
        try:
            dt.datetime.fromisoformat(base)
        except ValueError:
            raise spec_error(spec_path, f"{where}.base", f"{shown(base)} is not an ISO-8601 time") from None
        return TimestampRule(format=fmt, base=base, offsets=tuple((k, float(v)) for k, v in offsets.items()))
    if not isinstance(mapping.get("column"), str):
        raise spec_error(spec_path, f"{where}.column", "expected the source column holding the timestamp")
    if fmt == "strptime" and not isinstance(mapping.get("pattern"), str):
        raise spec_error(
            spec_path, f"{where}.pattern", "format strptime needs a pattern, e.g. '%Y-%m-%d %H:%M'"
        )
    if fmt == "strptime":
        problem = strptime_problem(mapping["pattern"])
        if problem:
            raise spec_error(
                spec_path,
                f"{where}.pattern",
                f"{shown(mapping['pattern'])} is not a strptime pattern ({problem}); "
                "use the directives of Python's datetime.strptime, e.g. '%Y-%m-%d %H:%M'",
            )
    timezone = mapping.get("timezone", "UTC")
    if not isinstance(timezone, str) or not _known_zone(timezone):
        raise spec_error(
            spec_path, f"{where}.timezone", f"{shown(timezone)} is not an IANA time zone (e.g. UTC)"
        )
    return TimestampRule(
        format=fmt, column=mapping["column"], pattern=mapping.get("pattern"), timezone=timezone
    )


def label_rule(spec_path: Path, value: Any) -> LabelRule:
    """The label section: a binary clicked column, or aggregated impressions and clicks."""
    mapping = expect_keys(spec_path, "label", value, {"form", "clicked", "impressions", "clicks"})
    form = mapping.get("form")
    if form not in LABEL_FORMS:
        raise spec_error(spec_path, "label.form", f"{shown(form)} is not one of {', '.join(LABEL_FORMS)}")
    if form == "binary":
        if not isinstance(mapping.get("clicked"), str) or {"impressions", "clicks"} & set(mapping):
            raise spec_error(spec_path, "label", "form binary takes exactly `clicked: <0/1 column>`")
        return LabelRule(form=form, clicked=mapping["clicked"])
    if not isinstance(mapping.get("impressions"), str) or not isinstance(mapping.get("clicks"), str):
        raise spec_error(spec_path, "label", "form aggregated takes `impressions:` and `clicks:` columns")
    return LabelRule(form=form, impressions=mapping["impressions"], clicks=mapping["clicks"])


def _source_path(spec_path: Path, where: str, value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise spec_error(spec_path, where, "expected a path")
    path = Path(os.path.expanduser(value))
    try:
        return (path if path.is_absolute() else base / path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11)
        raise spec_error(
            spec_path, where, f"{shown(path.name)} is a symlink loop; point it at the log file itself"
        ) from None


def source_rule(spec_path: Path, value: Any, base: Path) -> SourceRule:
    """The source section; relative paths are read from `base` (the data root or the spec's folder)."""
    mapping = expect_keys(spec_path, "source", value, {*SOURCE_LAYOUTS, "format", "delimiter"})
    fmt = mapping.get("format")
    if fmt not in FORMATS:
        raise spec_error(spec_path, "source.format", f"{shown(fmt)} is not one of {', '.join(FORMATS)}")
    named = [k for k in SOURCE_LAYOUTS if k in mapping]
    if len(named) != 1:
        raise spec_error(
            spec_path,
            "source",
            "give exactly one of path (one file), folder (every file in it), glob (a pattern such "
            "as 'part-*.parquet') or shards (a list of files)",
        )
    delimiter = mapping.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise spec_error(spec_path, "source.delimiter", "expected one character, e.g. ',' or '\\t'")
    rule = SourceRule(format=fmt, delimiter=delimiter, base=base)
    layout = named[0]
    if layout == "path":
        if not isinstance(mapping["path"], str):
            raise spec_error(spec_path, "source.path", "expected the path of the source file")
        return replace(rule, path=_source_path(spec_path, "source.path", mapping["path"], base))
    if layout == "folder":
        return replace(rule, folder=_source_path(spec_path, "source.folder", mapping["folder"], base))
    if layout == "glob":
        pattern = mapping["glob"]
        if not isinstance(pattern, str) or not any(c in pattern for c in "*?["):
            raise spec_error(
                spec_path, "source.glob", "expected a pattern with *, ? or [...], e.g. 'logs/part-*.parquet'"
            )
        return replace(rule, glob=os.path.expanduser(pattern))
    shards = mapping["shards"]
    if not isinstance(shards, list) or not shards:
        raise spec_error(spec_path, "source.shards", "expected a non-empty list of file paths")
    paths = tuple(_source_path(spec_path, f"source.shards[{i}]", v, base) for i, v in enumerate(shards))
    repeated = next((p for p in paths if paths.count(p) > 1), None)
    if repeated is not None:
        raise spec_error(spec_path, "source.shards", f"{repeated.name} is listed twice; list each shard once")
    return replace(rule, shards=paths)


# A numeric feature's name becomes a column of the impressions and a Feast feature name.
_NUMERIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def numeric_rules(spec_path: Path, value: Any, taken: set[str]) -> dict[str, NumericRule]:
    """The numeric section: feature name -> rule; a name may not be one of `taken` (schema or
    context columns)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise spec_error(spec_path, "numeric", "expected a mapping of feature name -> source column")
    rules = {}
    for name, rule in value.items():
        where = f"numeric.{name}"
        if not isinstance(name, str) or not _NUMERIC_NAME.match(name):
            raise spec_error(
                spec_path, where, "a feature name is lower case letters, digits and _, from a letter"
            )
        if name in taken:
            raise spec_error(spec_path, where, "is a schema or context column; give the feature another name")
        if isinstance(rule, str):
            rules[name] = NumericRule(column=rule)
            continue
        mapping = expect_keys(spec_path, where, rule, {"column", "log1p", "optional"})
        if not isinstance(mapping.get("column"), str):
            raise spec_error(spec_path, f"{where}.column", "expected the source column holding the number")
        for flag in ("log1p", "optional"):
            if not isinstance(mapping.get(flag, False), bool):
                raise spec_error(spec_path, f"{where}.{flag}", "expected true or false")
        rules[name] = NumericRule(
            column=mapping["column"],
            log1p=bool(mapping.get("log1p", False)),
            optional=bool(mapping.get("optional", False)),
        )
    return rules
