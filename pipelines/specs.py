"""Dataset specs: a small YAML file that maps a source log onto the canonical impression schema.

This module loads a spec and assembles its sections (pipelines/spec_rules.py) into a DatasetSpec.

A spec is validated when it is loaded (unknown keys, wrong types, leakage columns) and again
against the source's header before any row is read (unknown source columns), so a wrong spec
fails with one line that names the field and the fix, never with a traceback mid-pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nlpctr.atomic import JsonObject
from nlpctr.config_files import RefusedYaml, is_integer, load_bounded, yaml_problem
from nlpctr.datasets import BUNDLED_DATA_DIR
from nlpctr.errors import UserError
from nlpctr.models.schema import RESERVED_COLUMNS
from nlpctr.pipelines.spec_rules import (
    ColumnRule,
    LabelRule,
    NumericRule,
    SourceRule,
    TimestampRule,
    column_rule,
    expect_keys,
    finite_number,
    label_rule,
    numeric_rules,
    shown,
    source_rule,
    spec_error,
    str_list,
    timestamp_rule,
)

BUNDLED_SPEC_DIR = Path(__file__).resolve().parent / "specs"
SPLIT_MODES = ("within_group", "cold_group", "time")
# Target columns a spec maps (context columns are declared separately under `context`).
MAPPED_COLUMNS = ("impression_id", "query_id", "query_text", "ad_id", "ad_text")
REQUIRED_MAPPED = ("ad_id", "ad_text")
TEXT_COLUMNS = ("query_text", "ad_text")


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
    raw: JsonObject = field(repr=False)
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
                f"spec {self.spec_path.name}: source column {shown(repeated[0])} appears "
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
                f"spec {self.spec_path.name}: source column {shown(missing[0])} is not in "
                f"{file} (its header has {count}{hint}); fix the column name in the spec"
            )


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


def _mapped_columns(spec_path: Path, value: Any) -> dict[str, ColumnRule]:
    """The `columns` section: target schema column -> its rule."""
    if isinstance(value, dict):
        unused = next((c for c in UNUSED_COLUMNS if c in value), None)
        if unused is not None:
            raise spec_error(spec_path, f"columns.{unused}", UNUSED_COLUMNS[unused])
    columns_raw = expect_keys(spec_path, "columns", value, set(MAPPED_COLUMNS))
    columns = {
        target: column_rule(spec_path, f"columns.{target}", value)
        for target, value in columns_raw.items()
        if value is not None
    }
    for target in REQUIRED_MAPPED:
        if target not in columns:
            raise spec_error(spec_path, f"columns.{target}", "required; map it from a source column")
    if "query_id" in columns and "query_text" not in columns:
        raise spec_error(spec_path, "columns.query_text", "query_id is mapped, so query_text must be too")
    return columns


def _context_columns(spec_path: Path, value: Any) -> dict[str, ColumnRule]:
    """The `context` section: extra columns beside the schema's, each with its rule."""
    context_raw = value or {}
    if not isinstance(context_raw, dict):
        raise spec_error(spec_path, "context", "expected a mapping of context column -> source column")
    context = {}
    for target, value in context_raw.items():
        if not isinstance(target, str) or target in RESERVED_COLUMNS or not target.isidentifier():
            raise spec_error(
                spec_path, f"context.{target}", "is a reserved schema column or not an identifier"
            )
        context[target] = column_rule(spec_path, f"context.{target}", value)
    return context


def _group_and_entities(
    spec_path: Path, mapping: JsonObject, context: dict[str, ColumnRule]
) -> tuple[str, tuple[str, ...]]:
    """`group` (what the split keeps together) and `entities`: each a mapped id or context column."""
    known_targets = {"ad_id", "query_id", *context}
    group = mapping["group"]
    if not isinstance(group, str) or group not in known_targets:
        raise spec_error(
            spec_path,
            "group",
            f"{shown(group)} must be one of the mapped ids or context columns: "
            f"{', '.join(sorted(known_targets))}",
        )
    entities = str_list(spec_path, "entities", mapping.get("entities", ["ad_id"]))
    for entity in entities:
        if entity not in known_targets:
            raise spec_error(
                spec_path, "entities", f"{shown(entity)} must be one of {', '.join(sorted(known_targets))}"
            )
    return group, entities


def _split(spec_path: Path, value: Any) -> tuple[str, tuple[float, float, float]]:
    """The `split` section: its mode and the train/valid/test fractions, none of them empty."""
    split_raw = expect_keys(spec_path, "split", value or {}, {"mode", "fractions"})
    split_mode = split_raw.get("mode", "within_group")
    if split_mode not in SPLIT_MODES:
        raise spec_error(
            spec_path, "split.mode", f"{shown(split_mode)} is not one of {', '.join(SPLIT_MODES)}"
        )
    fractions = split_raw.get("fractions", [0.8, 0.1, 0.1])
    if (
        not isinstance(fractions, list)
        or len(fractions) != 3
        or any(not finite_number(f) or f < 0 for f in fractions)
        or (abs(sum(fractions) - 1.0) > 1e-6)
    ):
        raise spec_error(spec_path, "split.fractions", "expected three non-negative numbers summing to 1")
    if any(f == 0 for f in fractions):
        empty = [s for s, f in zip(("train", "valid", "test"), fractions, strict=True) if f == 0]
        splits = " and ".join(empty) + (" splits" if len(empty) > 1 else " split")
        raise spec_error(
            spec_path,
            "split.fractions",
            f"{shown(fractions)} leaves the {splits} empty: a model needs rows to train on, to choose its "
            "checkpoint on (valid) and to be tested on; give each split a share, e.g. [0.8, 0.1, 0.1]",
        )
    return split_mode, (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def parse_spec(raw: Any, spec_path: Path, bundled: bool = False) -> DatasetSpec:
    """Validate a spec mapping (already parsed from YAML)."""
    mapping = expect_keys(spec_path, "top level", raw, TOP_LEVEL_KEYS)
    for key in ("name", "source", "columns", "timestamp", "label", "group"):
        if key not in mapping:
            raise spec_error(spec_path, key, "missing; see the spec format in docs/USAGE.md")
    name = mapping["name"]
    if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
        raise spec_error(spec_path, "name", "expected a short identifier (letters, digits, _ and -)")

    columns = _mapped_columns(spec_path, mapping["columns"])
    context = _context_columns(spec_path, mapping.get("context"))
    numeric = numeric_rules(spec_path, mapping.get("numeric"), set(RESERVED_COLUMNS) | set(context))
    timestamp = timestamp_rule(spec_path, mapping["timestamp"])
    label = label_rule(spec_path, mapping["label"])
    source = source_rule(spec_path, mapping["source"], data_root() if bundled else spec_path.parent)
    group, entities = _group_and_entities(spec_path, mapping, context)
    split_mode, split_fractions = _split(spec_path, mapping.get("split"))

    max_chars = mapping.get("max_text_chars", 2000)
    if not is_integer(max_chars) or max_chars < 1:
        raise spec_error(spec_path, "max_text_chars", "expected a positive integer")

    max_reject_rate = mapping.get("max_reject_rate", 0.01)
    if not finite_number(max_reject_rate) or not 0 <= max_reject_rate <= 1:
        raise spec_error(spec_path, "max_reject_rate", "expected a fraction between 0 and 1")

    forbidden = str_list(spec_path, "forbidden", mapping["forbidden"]) if "forbidden" in mapping else ()
    for key in ("description", "notes"):
        if not isinstance(mapping.get(key, ""), str):
            raise spec_error(spec_path, key, "expected text")
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
        split_fractions=split_fractions,
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
        raise spec_error(
            spec_path,
            "forbidden",
            f"column {shown(leaked[0])} is computed from the outcome "
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
                f"dataset {shown(name_or_path)} is neither a bundled dataset ({', '.join(bundled_names())}) "
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
