"""Dataset specs: a small YAML file that maps a source log onto the canonical impression schema.

A spec is validated when it is loaded (unknown keys, wrong types, leakage columns) and again
against the source's header before any row is read (unknown source columns), so a wrong spec
fails with one line that names the field and the fix, never with a traceback mid-pipeline.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from nlpctr.config_files import RefusedYaml, is_integer, is_number, load_bounded, yaml_problem
from nlpctr.datasets import BUNDLED_DATA_DIR
from nlpctr.errors import UserError
from nlpctr.models.schema import RESERVED_COLUMNS

BUNDLED_SPEC_DIR = Path(__file__).resolve().parent / "specs"
FORMATS = ("parquet", "csv", "jsonl", "ubi_ndjson")
TIMESTAMP_FORMATS = ("iso8601", "iso_week", "year_week", "epoch_s", "epoch_ms", "strptime", "offset")
LABEL_FORMS = ("binary", "aggregated")
SPLIT_MODES = ("within_group", "cold_group", "time")
TRANSFORMS = ("strip_html", "fix_mojibake")
# Target columns a spec maps (context columns are declared separately under `context`).
MAPPED_COLUMNS = ("impression_id", "query_id", "query_text", "ad_id", "ad_text")
REQUIRED_MAPPED = ("ad_id", "ad_text")
TEXT_COLUMNS = ("query_text", "ad_text")
# How a source names its files: one literal file, or shards (a folder, a glob, a list).
SOURCE_LAYOUTS = ("path", "folder", "glob", "shards")


def data_root() -> Path:
    """Where bundled datasets live: $NLPCTR_DATA_ROOT, else the copies inside the package."""
    env = os.environ.get("NLPCTR_DATA_ROOT")
    if not env:
        return BUNDLED_DATA_DIR
    root = Path(env).expanduser()
    if not root.is_dir():
        raise UserError(
            f"the data root NLPCTR_DATA_ROOT={env!r} is not a folder; point it at a folder laid out like the "
            "bundled datasets' (upworthy/, trec2013/, esci_ubi/), or unset it to use the package's copies"
        )
    return root.resolve()


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


@dataclass(frozen=True)
class DatasetSpec:
    """A validated dataset spec. `raw` keeps the YAML mapping for the manifest and the hash."""

    name: str
    description: str
    source: SourceRule
    columns: dict[str, ColumnRule]
    timestamp: TimestampRule
    context: dict[str, ColumnRule]
    label: LabelRule
    group: str
    entities: tuple[str, ...]
    split_mode: str
    split_fractions: tuple[float, float, float]
    max_text_chars: int
    max_reject_rate: float
    forbidden: tuple[str, ...]
    notes: str
    spec_path: Path
    raw: dict[str, Any] = field(repr=False)
    numeric: dict[str, NumericRule] = field(default_factory=dict)

    @property
    def context_columns(self) -> tuple[str, ...]:
        return tuple(self.context)

    @property
    def numeric_columns(self) -> tuple[str, ...]:
        """The numeric features' names (their columns in the impressions)."""
        return tuple(self.numeric)

    @property
    def spec_hash(self) -> str:
        canonical = json.dumps(self.raw, sort_keys=True, default=str).encode("utf-8")
        return hashlib.sha256(canonical).hexdigest()[:16]

    def source_columns(self) -> set[str]:
        """Every source column the spec reads."""
        used: set[str] = set()
        for rule in (*self.columns.values(), *self.context.values()):
            used.update(rule.sources)
        used.update(self.timestamp.sources)
        used.update(self.label.sources)
        used.update(rule.column for rule in self.numeric.values())
        return used

    def check_source_columns(self, available: list[str], file: str | None = None) -> None:
        """Fail with one line if the spec reads a column the source does not have. The line
        names the column and the file, never the file's content: a spec may point at any file
        its user can read, and an error message travels further than the file does. `file`: the
        shard whose header this is (default: the source's own name)."""
        file = file or Path(self.source.location).name
        repeated = sorted(c for c in self.source_columns() if available.count(c) > 1)
        if repeated:  # a record keeps one of the copies: which one the spec reads is arbitrary
            raise UserError(
                f"spec {self.spec_path.name}: source column {_shown(repeated[0])} appears "
                f"{available.count(repeated[0])} times in the header of {file}; "
                "rename the copies so that the spec reads one"
            )
        missing = sorted(self.source_columns() - set(available))
        if missing:
            count = f"{len(available)} column{'s' if len(available) != 1 else ''}"
            hint = ""
            if self.source.format == "csv" and len(available) == 1:
                hint = f"; if it has more, source.delimiter {self.source.delimiter!r} is not its delimiter"
            raise UserError(
                f"spec {self.spec_path.name}: source column {_shown(missing[0])} is not in "
                f"{file} (its header has {count}{hint}); fix the column name in the spec"
            )


def _is_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _known_zone(name: str) -> bool:
    if name.upper() == "UTC":
        return True
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


def _shown(value: Any, limit: int = 60) -> str:
    """A spec value in an error message: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _fail(spec_path: Path, where: str, message: str) -> UserError:
    where = where if len(where) <= 80 else where[:79] + "…"
    return UserError(f"spec {spec_path.name}: {where}: {message}")


def _expect_keys(spec_path: Path, where: str, mapping: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise _fail(spec_path, where, f"expected a mapping, got {type(mapping).__name__}")
    unknown = sorted((set(mapping) - allowed), key=str)
    if unknown:
        raise _fail(
            spec_path, where, f"unknown key {_shown(unknown[0])}; allowed: {', '.join(sorted(allowed))}"
        )
    return mapping


def _str_list(spec_path: Path, where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _fail(spec_path, where, "expected a column name or a non-empty list of column names")
    return tuple(value)


def _column_rule(spec_path: Path, where: str, value: Any) -> ColumnRule:
    if isinstance(value, str):
        return ColumnRule(column=value)
    mapping = _expect_keys(
        spec_path, where, value, {"column", "hash_of", "concat", "text_id_of", "transform"}
    )
    kinds = [k for k in ("column", "hash_of", "concat", "text_id_of") if k in mapping]
    if len(kinds) != 1:
        raise _fail(spec_path, where, "give exactly one of column, hash_of, concat, text_id_of")
    transforms = (
        _str_list(spec_path, f"{where}.transform", mapping["transform"]) if "transform" in mapping else ()
    )
    for transform in transforms:
        if transform not in TRANSFORMS:
            raise _fail(
                spec_path, f"{where}.transform", f"{_shown(transform)} is not one of {', '.join(TRANSFORMS)}"
            )
    kind = kinds[0]
    if kind in ("column", "text_id_of"):
        if not isinstance(mapping[kind], str):
            raise _fail(spec_path, f"{where}.{kind}", "expected a column name")
        return ColumnRule(**{kind: mapping[kind]}, transforms=transforms)
    return ColumnRule(**{kind: _str_list(spec_path, f"{where}.{kind}", mapping[kind])}, transforms=transforms)


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


def _timestamp_rule(spec_path: Path, value: Any) -> TimestampRule:
    where = "timestamp"
    mapping = _expect_keys(
        spec_path, where, value, {"column", "format", "pattern", "timezone", "base", "offsets"}
    )
    fmt = mapping.get("format")
    if fmt not in TIMESTAMP_FORMATS:
        raise _fail(
            spec_path, f"{where}.format", f"{_shown(fmt)} is not one of {', '.join(TIMESTAMP_FORMATS)}"
        )
    if fmt == "offset":
        offsets = mapping.get("offsets")
        if not isinstance(offsets, dict) or not offsets or "base" not in mapping:
            raise _fail(spec_path, where, "format offset needs `base` and `offsets: {column: seconds}`")
        for name, seconds in offsets.items():
            if not isinstance(name, str):
                raise _fail(spec_path, f"{where}.offsets", f"expected column names, got {_shown(name)}")
            if not _is_number(seconds):
                raise _fail(spec_path, f"{where}.offsets.{name}", "expected seconds as a finite number")
        base = str(mapping["base"])
        try:
            dt.datetime.fromisoformat(base)
        except ValueError:
            raise _fail(spec_path, f"{where}.base", f"{_shown(base)} is not an ISO-8601 time") from None
        return TimestampRule(format=fmt, base=base, offsets=tuple((k, float(v)) for k, v in offsets.items()))
    if not isinstance(mapping.get("column"), str):
        raise _fail(spec_path, f"{where}.column", "expected the source column holding the timestamp")
    if fmt == "strptime" and not isinstance(mapping.get("pattern"), str):
        raise _fail(spec_path, f"{where}.pattern", "format strptime needs a pattern, e.g. '%Y-%m-%d %H:%M'")
    if fmt == "strptime":
        problem = strptime_problem(mapping["pattern"])
        if problem:
            raise _fail(
                spec_path,
                f"{where}.pattern",
                f"{_shown(mapping['pattern'])} is not a strptime pattern ({problem}); "
                "use the directives of Python's datetime.strptime, e.g. '%Y-%m-%d %H:%M'",
            )
    timezone = mapping.get("timezone", "UTC")
    if not isinstance(timezone, str) or not _known_zone(timezone):
        raise _fail(spec_path, f"{where}.timezone", f"{_shown(timezone)} is not an IANA time zone (e.g. UTC)")
    return TimestampRule(
        format=fmt, column=mapping["column"], pattern=mapping.get("pattern"), timezone=timezone
    )


def _label_rule(spec_path: Path, value: Any) -> LabelRule:
    mapping = _expect_keys(spec_path, "label", value, {"form", "clicked", "impressions", "clicks"})
    form = mapping.get("form")
    if form not in LABEL_FORMS:
        raise _fail(spec_path, "label.form", f"{_shown(form)} is not one of {', '.join(LABEL_FORMS)}")
    if form == "binary":
        if not isinstance(mapping.get("clicked"), str) or {"impressions", "clicks"} & set(mapping):
            raise _fail(spec_path, "label", "form binary takes exactly `clicked: <0/1 column>`")
        return LabelRule(form=form, clicked=mapping["clicked"])
    if not isinstance(mapping.get("impressions"), str) or not isinstance(mapping.get("clicks"), str):
        raise _fail(spec_path, "label", "form aggregated takes `impressions:` and `clicks:` columns")
    return LabelRule(form=form, impressions=mapping["impressions"], clicks=mapping["clicks"])


def _source_path(spec_path: Path, where: str, value: Any, base: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise _fail(spec_path, where, "expected a path")
    path = Path(os.path.expanduser(value))
    try:
        return (path if path.is_absolute() else base / path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python 3.11)
        raise _fail(
            spec_path, where, f"{_shown(path.name)} is a symlink loop; point it at the log file itself"
        ) from None


def _source_rule(spec_path: Path, value: Any, bundled: bool) -> SourceRule:
    mapping = _expect_keys(spec_path, "source", value, {*SOURCE_LAYOUTS, "format", "delimiter"})
    fmt = mapping.get("format")
    if fmt not in FORMATS:
        raise _fail(spec_path, "source.format", f"{_shown(fmt)} is not one of {', '.join(FORMATS)}")
    named = [k for k in SOURCE_LAYOUTS if k in mapping]
    if len(named) != 1:
        raise _fail(
            spec_path,
            "source",
            "give exactly one of path (one file), folder (every file in it), glob (a pattern such "
            "as 'part-*.parquet') or shards (a list of files)",
        )
    base = data_root() if bundled else spec_path.parent
    delimiter = mapping.get("delimiter", ",")
    if not isinstance(delimiter, str) or len(delimiter) != 1:
        raise _fail(spec_path, "source.delimiter", "expected one character, e.g. ',' or '\\t'")
    rule = SourceRule(format=fmt, delimiter=delimiter, base=base)
    layout = named[0]
    if layout == "path":
        if not isinstance(mapping["path"], str):
            raise _fail(spec_path, "source.path", "expected the path of the source file")
        return replace(rule, path=_source_path(spec_path, "source.path", mapping["path"], base))
    if layout == "folder":
        return replace(rule, folder=_source_path(spec_path, "source.folder", mapping["folder"], base))
    if layout == "glob":
        pattern = mapping["glob"]
        if not isinstance(pattern, str) or not any(c in pattern for c in "*?["):
            raise _fail(
                spec_path, "source.glob", "expected a pattern with *, ? or [...], e.g. 'logs/part-*.parquet'"
            )
        return replace(rule, glob=os.path.expanduser(pattern))
    shards = mapping["shards"]
    if not isinstance(shards, list) or not shards:
        raise _fail(spec_path, "source.shards", "expected a non-empty list of file paths")
    paths = tuple(_source_path(spec_path, f"source.shards[{i}]", v, base) for i, v in enumerate(shards))
    repeated = next((p for p in paths if paths.count(p) > 1), None)
    if repeated is not None:
        raise _fail(spec_path, "source.shards", f"{repeated.name} is listed twice; list each shard once")
    return replace(rule, shards=paths)


# A numeric feature's name becomes a column of the impressions and a Feast feature name.
_NUMERIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def _numeric_rules(spec_path: Path, value: Any, taken: set[str]) -> dict[str, NumericRule]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(spec_path, "numeric", "expected a mapping of feature name -> source column")
    rules = {}
    for name, rule in value.items():
        where = f"numeric.{name}"
        if not isinstance(name, str) or not _NUMERIC_NAME.match(name):
            raise _fail(spec_path, where, "a feature name is lower case letters, digits and _, from a letter")
        if name in taken:
            raise _fail(spec_path, where, "is a schema or context column; give the feature another name")
        if isinstance(rule, str):
            rules[name] = NumericRule(column=rule)
            continue
        mapping = _expect_keys(spec_path, where, rule, {"column", "log1p", "optional"})
        if not isinstance(mapping.get("column"), str):
            raise _fail(spec_path, f"{where}.column", "expected the source column holding the number")
        for flag in ("log1p", "optional"):
            if not isinstance(mapping.get(flag, False), bool):
                raise _fail(spec_path, f"{where}.{flag}", "expected true or false")
        rules[name] = NumericRule(
            column=mapping["column"],
            log1p=bool(mapping.get("log1p", False)),
            optional=bool(mapping.get("optional", False)),
        )
    return rules


TOP_LEVEL_KEYS = {
    "name", "description", "source", "columns", "timestamp", "context", "label", "group",
    "entities", "split", "max_text_chars", "max_reject_rate", "forbidden", "notes", "numeric",
}  # fmt: skip
# A column that specs once mapped and nothing ever read: refused with the reason, not dropped.
UNUSED_COLUMNS = {
    "ad_extra_text": (
        "no model reads a second ad text (the embedding job and every arm read query_text and "
        "ad_text only; docs/USAGE.md says why); remove it from the spec"
    ),
}


def parse_spec(raw: Any, spec_path: Path, bundled: bool = False) -> DatasetSpec:
    """Validate a spec mapping (already parsed from YAML)."""
    mapping = _expect_keys(spec_path, "top level", raw, TOP_LEVEL_KEYS)
    for key in ("name", "source", "columns", "timestamp", "label", "group"):
        if key not in mapping:
            raise _fail(spec_path, key, "missing; see the spec format in docs/USAGE.md")
    name = mapping["name"]
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise _fail(spec_path, "name", "expected a short identifier (letters, digits, _ and -)")

    if isinstance(mapping["columns"], dict):
        unused = next((c for c in UNUSED_COLUMNS if c in mapping["columns"]), None)
        if unused is not None:
            raise _fail(spec_path, f"columns.{unused}", UNUSED_COLUMNS[unused])
    columns_raw = _expect_keys(spec_path, "columns", mapping["columns"], set(MAPPED_COLUMNS))
    columns = {
        target: _column_rule(spec_path, f"columns.{target}", value)
        for target, value in columns_raw.items()
        if value is not None
    }
    for target in REQUIRED_MAPPED:
        if target not in columns:
            raise _fail(spec_path, f"columns.{target}", "required; map it from a source column")
    if "query_id" in columns and "query_text" not in columns:
        raise _fail(spec_path, "columns.query_text", "query_id is mapped, so query_text must be too")

    context_raw = mapping.get("context") or {}
    if not isinstance(context_raw, dict):
        raise _fail(spec_path, "context", "expected a mapping of context column -> source column")
    context = {}
    for target, value in context_raw.items():
        if not isinstance(target, str) or target in RESERVED_COLUMNS or not target.isidentifier():
            raise _fail(spec_path, f"context.{target}", "is a reserved schema column or not an identifier")
        context[target] = _column_rule(spec_path, f"context.{target}", value)

    numeric = _numeric_rules(spec_path, mapping.get("numeric"), set(RESERVED_COLUMNS) | set(context))
    timestamp = _timestamp_rule(spec_path, mapping["timestamp"])
    label = _label_rule(spec_path, mapping["label"])
    source = _source_rule(spec_path, mapping["source"], bundled)

    known_targets = {"ad_id", "query_id", *context}
    group = mapping["group"]
    if not isinstance(group, str) or group not in known_targets:
        raise _fail(
            spec_path,
            "group",
            f"{_shown(group)} must be one of the mapped ids or context columns: "
            f"{', '.join(sorted(known_targets))}",
        )
    entities = _str_list(spec_path, "entities", mapping.get("entities", ["ad_id"]))
    for entity in entities:
        if entity not in known_targets:
            raise _fail(
                spec_path, "entities", f"{_shown(entity)} must be one of {', '.join(sorted(known_targets))}"
            )

    split_raw = _expect_keys(spec_path, "split", mapping.get("split") or {}, {"mode", "fractions"})
    split_mode = split_raw.get("mode", "within_group")
    if split_mode not in SPLIT_MODES:
        raise _fail(spec_path, "split.mode", f"{_shown(split_mode)} is not one of {', '.join(SPLIT_MODES)}")
    fractions = split_raw.get("fractions", [0.8, 0.1, 0.1])
    if (
        not isinstance(fractions, list)
        or len(fractions) != 3
        or any(not _is_number(f) or f < 0 for f in fractions)
        or (abs(sum(fractions) - 1.0) > 1e-6)
    ):
        raise _fail(spec_path, "split.fractions", "expected three non-negative numbers summing to 1")
    if any(f == 0 for f in fractions):
        empty = [s for s, f in zip(("train", "valid", "test"), fractions, strict=True) if f == 0]
        splits = " and ".join(empty) + (" splits" if len(empty) > 1 else " split")
        raise _fail(
            spec_path,
            "split.fractions",
            f"{_shown(fractions)} leaves the {splits} empty: a model needs rows to train on, to choose its "
            "checkpoint on (valid) and to be tested on; give each split a share, e.g. [0.8, 0.1, 0.1]",
        )

    max_chars = mapping.get("max_text_chars", 2000)
    if not is_integer(max_chars) or max_chars < 1:
        raise _fail(spec_path, "max_text_chars", "expected a positive integer")

    max_reject_rate = mapping.get("max_reject_rate", 0.01)
    if not _is_number(max_reject_rate) or not 0 <= max_reject_rate <= 1:
        raise _fail(spec_path, "max_reject_rate", "expected a fraction between 0 and 1")

    forbidden = _str_list(spec_path, "forbidden", mapping["forbidden"]) if "forbidden" in mapping else ()
    for key in ("description", "notes"):
        if not isinstance(mapping.get(key, ""), str):
            raise _fail(spec_path, key, "expected text")
    spec = DatasetSpec(
        name=name,
        description=str(mapping.get("description", "")),
        source=source,
        columns=columns,
        timestamp=timestamp,
        context=context,
        label=label,
        group=group,
        entities=entities,
        split_mode=split_mode,
        split_fractions=(float(fractions[0]), float(fractions[1]), float(fractions[2])),
        max_text_chars=max_chars,
        max_reject_rate=float(max_reject_rate),
        forbidden=forbidden,
        notes=str(mapping.get("notes", "")),
        spec_path=spec_path,
        raw=mapping,
        numeric=numeric,
    )
    leaked = sorted(spec.source_columns() & set(forbidden))
    if leaked:
        raise _fail(
            spec_path,
            "forbidden",
            f"column {_shown(leaked[0])} is computed from the outcome "
            "(label leakage) and may not be used; remove it from the mapping",
        )
    return spec


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED_SPEC_DIR.glob("*.yaml"))


def _spec_file(name_or_path: str) -> Path | None:
    """The spec file a user named, or None (a NUL byte, a too-long name, an unknown ~user)."""
    try:
        path = Path(name_or_path).expanduser().resolve()
        return path if path.is_file() else None
    except (OSError, ValueError, RuntimeError):
        return None


def load_spec(name_or_path: str) -> DatasetSpec:
    """Load a bundled spec by name (`upworthy`) or a user's spec by path (`my_log.yaml`)."""
    if name_or_path in bundled_names():
        path, is_bundled = BUNDLED_SPEC_DIR / f"{name_or_path}.yaml", True
    else:
        path, is_bundled = _spec_file(name_or_path), False
        if path is None:
            raise UserError(
                f"dataset {_shown(name_or_path)} is neither a bundled dataset ({', '.join(bundled_names())}) "
                "nor a spec file; pass a bundled name or the path of a YAML spec"
            )
    try:
        raw = load_bounded(path, noun="a spec")
    except RefusedYaml as exc:
        raise UserError(f"spec {path.name}: refused: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"spec {path.name}: not valid YAML ({yaml_problem(exc)}); fix the file") from None
    except UnicodeDecodeError as exc:
        raise UserError(
            f"spec {path.name}: not valid YAML (not UTF-8 at byte {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise UserError(f"spec {path}: cannot be read ({exc.strerror}); check the path") from None
    return parse_spec(raw, path, bundled=is_bundled)
