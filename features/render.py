"""Render a dataset's Feast definitions, `DIR/feature_repo/repo_definitions.py`.

`nlpctr features apply --data DIR` writes `feature_store.yaml` (`store_config`) and
`repo_definitions.py` (`render_module`: plain Feast declarations, `feast init` style) from the
objects `build_definitions` returns; `check_module` verifies at every apply that the module
yields equal objects, so `feast apply` and `nlpctr features apply` register the same thing.
Example output and `DATA_DIR`: docs/DESIGN.md, "Modules in detail", render.py.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from feast import Entity, FeatureService, FeatureView, Field, FileSource
from feast import types as feast_types
from feast.data_format import ParquetFormat
from feast.data_source import DataSource

# Feast's Spark source imports no pyspark: the module renders and reads Spark repos without it.
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.types import Array, FeastType, PrimitiveFeastType
from google.protobuf.message import Message

from nlpctr.features.definitions import Definitions

REPO_MODULE = "repo_definitions.py"


# ------------------------------------------------------------------------------- module

# The module constant that records `apply --encoder` (read back by `store.reapply`).
ENCODER_CONSTANT = "NLPCTR_ENCODER"
_ENCODER_LINE = re.compile(rf'^{ENCODER_CONSTANT} = (?:"([a-z0-9_]+)"|None)$', re.MULTILINE)
# Modules rendered before the declarations were written out called build_definitions(..., encoder=...).
_LEGACY_ENCODER = re.compile(r"encoder=(?:'([a-z0-9_]+)'|None)\)")
_INDENT = "    "
# Float32, String, ...: the names feast.types exports its primitive types under.
_PRIMITIVE_NAMES = {
    value: name
    for name, value in vars(feast_types).items()
    if isinstance(value, PrimitiveFeastType) and name[:1].isupper() and not name.isupper()
}
_RESERVED = {
    "DATA_DIR",
    ENCODER_CONSTANT,
    "Path",
    "timedelta",
    "ValueType",
    "Array",
    "ParquetFormat",
    "SparkSource",
}


def read_encoder(text: str) -> str | None:
    """The encoder a rendered module was applied with (None: the only one, or none)."""
    found = _ENCODER_LINE.search(text) or _LEGACY_ENCODER.search(text)
    return found.group(1) if found else None


# ------------------------------------------------------------------------------- literals


def _str(value: str) -> str:
    """A double-quoted Python string literal (JSON's escapes are Python's)."""
    return json.dumps(value, ensure_ascii=False)


def _strings(values: Iterable[str]) -> str:
    return "[" + ", ".join(_str(v) for v in values) + "]"


def _mapping(values: dict[str, str]) -> str:
    return "{" + ", ".join(f"{_str(k)}: {_str(v)}" for k, v in values.items()) + "}"


def _timedelta(value: timedelta) -> str:
    """`timedelta(0)`, `timedelta(days=30)`, `timedelta(hours=1, minutes=30)`, ..."""
    if not value:
        return "timedelta(0)"
    if value < timedelta(0):
        return f"timedelta(seconds={value.total_seconds()!r})"
    hours, seconds = divmod(value.seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = {
        "days": value.days,
        "hours": hours,
        "minutes": minutes,
        "seconds": seconds,
        "microseconds": value.microseconds,
    }
    return "timedelta(" + ", ".join(f"{k}={v}" for k, v in parts.items() if v) + ")"


def _dtype(dtype: FeastType, used: set[str]) -> str:
    if isinstance(dtype, PrimitiveFeastType) and dtype in _PRIMITIVE_NAMES:
        used.add(_PRIMITIVE_NAMES[dtype])
        return _PRIMITIVE_NAMES[dtype]
    if isinstance(dtype, Array):
        used.add("Array")
        return f"Array({_dtype(dtype.base_type, used)})"
    raise ValueError(f"cannot render Feast type {dtype!r}")


def _path(path: str, data_dir: Path) -> str:
    """A source path as `str(DATA_DIR / "a" / "b")` when it lies under the dataset folder."""
    try:
        parts = Path(path).relative_to(data_dir).parts
    except ValueError:
        return _str(path)
    return "str(" + " / ".join(["DATA_DIR", *(_str(p) for p in parts)]) + ")" if parts else "str(DATA_DIR)"


_Value = str | list[str] | dict[str, str]
_WIDTH = 110  # the project's line length


def _call(target: str, kind: str, args: list[tuple[str, _Value]]) -> str:
    """`target = Kind(` then one `key=value,` a line (black's layout): a list one item a line,
    a mapping on one line where it fits, else one entry a line."""
    lines = [f"{target} = {kind}("]
    for key, value in args:
        if isinstance(value, list):
            lines.append(f"{_INDENT}{key}=[")
            lines += [f"{_INDENT * 2}{item}," for item in value]
            lines.append(f"{_INDENT}],")
        elif isinstance(value, dict):
            line = f"{_INDENT}{key}={_mapping(value)},"
            if len(line) > _WIDTH:
                items = [f"{_INDENT * 2}{_str(k)}: {_str(v)}," for k, v in value.items()]
                line = "\n".join([f"{_INDENT}{key}={{", *items, f"{_INDENT}}},"])
            lines.append(line)
        else:
            lines.append(f"{_INDENT}{key}={value},")
    lines.append(")")
    return "\n".join(lines)


def _common(obj: Any, args: list[tuple[str, _Value]]) -> list[tuple[str, _Value]]:
    """description, tags and owner, where set."""
    if obj.description:
        args.append(("description", _str(obj.description)))
    if obj.tags:
        args.append(("tags", dict(obj.tags)))
    if obj.owner:
        args.append(("owner", _str(obj.owner)))
    return args


# ------------------------------------------------------------------------------- declarations


class _Names:
    """Module attribute names, one per object: `<entity>`, `<source>`, `<view>_fv`, `<service>`
    (Feast's template style), suffixed where a name would clash or is not an identifier."""

    def __init__(self) -> None:
        self.taken = set(_RESERVED)
        self.by_object: dict[tuple[str, str], str] = {}

    def add(self, kind: str, name: str, suffix: str = "") -> str:
        base = re.sub(r"\W", "_", name) + suffix
        if not base.isidentifier() or keyword.iskeyword(base) or base[:1].isupper():
            base = f"{kind}_{base}"
        candidate, n = base, 1
        while candidate in self.taken:
            candidate, n = f"{base}_{kind}" if n == 1 else f"{base}_{kind}{n}", n + 1
        self.taken.add(candidate)
        self.by_object[(kind, name)] = candidate
        return candidate

    def __getitem__(self, key: tuple[str, str]) -> str:
        return self.by_object[key]


def _entity(entity: Entity, target: str) -> str:
    args: list[tuple[str, _Value]] = [
        ("name", _str(entity.name)),
        ("join_keys", _strings([entity.join_key])),
    ]
    if entity.value_type is not None:
        args.append(("value_type", f"ValueType.{entity.value_type.name}"))
    return _call(target, "Entity", _common(entity, args))


def _source(source: DataSource, target: str, data_dir: Path) -> str:
    """A FileSource (parquet) or a SparkSource (a parquet path): what `parquet_source` builds."""
    if source.field_mapping or source.created_timestamp_column or source.date_partition_column:
        raise ValueError(f"cannot render source {source.name}: field mapping or extra timestamp columns")
    spark = isinstance(source, SparkSource)
    if not (spark or isinstance(source, FileSource)) or (spark and (source.table or source.query)):
        raise ValueError(f"cannot render source {source.name}: only parquet paths are rendered")
    parquet = source.file_format == "parquet" if spark else isinstance(source.file_format, ParquetFormat)
    if source.file_format is not None and not parquet:
        raise ValueError(f"cannot render source {source.name}: only parquet sources are rendered")
    args: list[tuple[str, _Value]] = [
        ("name", _str(source.name)),
        ("path", _path(source.path, data_dir)),
        ("timestamp_field", _str(source.timestamp_field)),
    ]
    if source.file_format is not None:
        args.append(("file_format", '"parquet"' if spark else "ParquetFormat()"))
    return _call(target, type(source).__name__, _common(source, args))


def _field(field: Field, used: set[str]) -> str:
    extra = f", description={_str(field.description)}" if field.description else ""
    if field.tags:
        extra += f", tags={_mapping(dict(field.tags))}"
    return f"Field(name={_str(field.name)}, dtype={_dtype(field.dtype, used)}{extra})"


def _view(view: FeatureView, target: str, names: _Names, used: set[str]) -> str:
    if view.stream_source is not None or view.source_views:
        raise ValueError(f"cannot render feature view {view.name}: only batch file sources are rendered")
    # Schema order as declared: the join-key columns, then the features.
    schema = [_field(f, used) for f in [*view.entity_columns, *view.features]]
    args: list[tuple[str, _Value]] = [
        ("name", _str(view.name)),
        ("entities", "[" + ", ".join(names[("entity", e)] for e in view.entities) + "]"),
        ("ttl", _timedelta(view.ttl or timedelta(0))),
        ("schema", schema),
        ("source", names[("source", view.batch_source.name)]),
        ("online", repr(bool(view.online))),
    ]
    if view.offline:
        args.append(("offline", "True"))
    return _call(target, "FeatureView", _common(view, args))


def _service(service: FeatureService, target: str, views: dict[str, FeatureView], names: _Names) -> str:
    items = []
    for projection in service.feature_view_projections:
        view = views[projection.name]
        wanted = [f.name for f in projection.features]
        chain = [names[("view", view.name)]]
        if wanted != [f.name for f in view.features]:
            chain[0] += f"[{_strings(wanted)}]"
        if projection.name_alias:
            chain.append(f".with_name({_str(projection.name_alias)})")
        if projection.join_key_map:
            chain.append(f".with_join_key_map({_mapping(dict(projection.join_key_map))})")
        # One call a line where the whole would not fit (as black lays out a fluent chain).
        fits = len(_INDENT * 2) + len("".join(chain)) + 1 <= _WIDTH
        items.append("".join(chain) if fits else f"\n{_INDENT * 2}".join(chain))
    args: list[tuple[str, _Value]] = [("name", _str(service.name)), ("features", items)]
    return _call(target, "FeatureService", _common(service, args))


def _section(title: str, blocks: list[str]) -> list[str]:
    if not blocks:
        return []
    rule = "# " + "-" * (94 - len(title)) + " " + title
    return [rule, *blocks]


def render_module(definitions: Definitions, data_dir: Path, dataset: str) -> str:
    """The feature-repo module declaring `definitions` (a dataset folder's Feast objects)."""
    data_dir = Path(data_dir).resolve()
    names = _Names()
    for name in definitions.entities:
        names.add("entity", name)
    for name in definitions.sources:
        names.add("source", name, "" if name.endswith("_source") else "_source")
    for name in definitions.views:
        names.add("view", name, "_fv")
    for name in definitions.services:
        names.add("service", name)
    used: set[str] = set()  # the feast.types names the schema needs
    entities = [_entity(e, names[("entity", n)]) for n, e in definitions.entities.items()]
    views = []
    for name, view in definitions.views.items():
        source = view.batch_source
        if definitions.sources.get(source.name) != source:
            raise ValueError(
                f"feature view {name} reads source {source.name}, which is not among the sources"
            )
        views.append(_source(source, names[("source", source.name)], data_dir))
        views.append(_view(view, names[("view", name)], names, used))
    orphans = set(definitions.sources) - {v.batch_source.name for v in definitions.views.values()}
    views += [_source(definitions.sources[n], names[("source", n)], data_dir) for n in sorted(orphans)]
    services = [
        _service(s, names[("service", n)], definitions.views, names) for n, s in definitions.services.items()
    ]
    type_names = sorted(used)
    source_kinds = {type(s).__name__ for s in definitions.sources.values()}
    feast_names = [
        "Entity",
        "FeatureService",
        "FeatureView",
        "Field",
        *sorted(source_kinds - {"SparkSource"}),
    ]
    feast_names += ["ValueType"] * any(e.value_type is not None for e in definitions.entities.values())
    types_import = f"from feast.types import {', '.join(type_names)}\n" if type_names else ""
    if any(isinstance(s, FileSource) and s.file_format is not None for s in definitions.sources.values()):
        types_import = "from feast.data_format import ParquetFormat\n" + types_import
    if "SparkSource" in source_kinds:
        types_import = f"from {SparkSource.__module__} import SparkSource\n" + types_import
    encoder = _str(definitions.default_encoder) if definitions.default_encoder else "None"
    header = f'''"""Feast definitions of the prepared dataset {dataset!r} in the folder above this one.

Generated by `nlpctr features apply` from what the batch jobs wrote there (the objects of
nlpctr.features.definitions.build_definitions, written out): `feast plan` / `feast apply` here
and `nlpctr features apply` register the same thing. Re-run `nlpctr features apply` rather than
edit: it rewrites this file. feature_store.yaml beside it holds the store's configuration.
"""

from datetime import timedelta
from pathlib import Path

from feast import {", ".join(feast_names)}
{types_import}
# The prepared dataset folder; every source is a parquet folder a batch job wrote under it.
DATA_DIR = Path(__file__).resolve().parent.parent
# The encoder whose embeddings `cascade_frozen` serves (`nlpctr features apply --encoder`).
{ENCODER_CONSTANT} = {encoder}
'''
    blocks = [
        *_section("entities", entities),
        *_section("sources and feature views", views),
        *_section("feature services", services),
    ]
    return header + "".join(f"\n\n{block}" for block in blocks) + "\n"


# ------------------------------------------------------------------------------- check


def _objects(namespace: dict[str, Any]) -> dict[tuple[str, str], Any]:
    kinds: dict[type, str] = {
        Entity: "entity",
        FileSource: "source",
        SparkSource: "source",
        FeatureView: "view",
        FeatureService: "service",
    }
    return {(kinds[type(v)], v.name): v for v in namespace.values() if type(v) in kinds}


def execute_module(text: str, path: Path) -> dict[tuple[str, str], Any]:
    """Run a rendered module as if it were `path`; its Feast objects by (kind, name)."""
    namespace: dict[str, Any] = {"__file__": str(path), "__name__": "repo_definitions"}
    exec(compile(text, str(path), "exec"), namespace)
    return _objects(namespace)


def differences(text: str, path: Path, definitions: Definitions) -> list[str]:
    """How the objects of a rendered module differ from `definitions` (empty: not at all)."""
    found = execute_module(text, path)
    wanted: dict[tuple[str, str], Any] = {}
    for kind, objects in (
        ("entity", definitions.entities),
        ("source", definitions.sources),
        ("view", definitions.views),
        ("service", definitions.services),
    ):
        wanted.update({(kind, n): o for n, o in objects.items()})
    out = [f"missing {k} {n}" for k, n in sorted(set(wanted) - set(found))]
    out += [f"extra {k} {n}" for k, n in sorted(set(found) - set(wanted))]
    out += [
        f"{kind} {name} differs"
        for kind, name in sorted(set(wanted) & set(found))
        if not same_object(wanted[(kind, name)], found[(kind, name)])
    ]
    return out


def same_object(a: Any, b: Any) -> bool:
    """Equal as Feast compares them, and proto for proto but for creation times."""
    return bool(a == b) and _timeless(a.to_proto()) == _timeless(b.to_proto())


_TIMES = ("created_timestamp", "last_updated_timestamp")


def _timeless(message: Message) -> Message:
    """A copy of a proto without the creation/update times Feast stamps on construction."""
    out = type(message)()
    out.CopyFrom(message)
    stack = [out]
    while stack:
        current = stack.pop()
        for field, value in current.ListFields():
            if field.name in _TIMES and field.message_type is not None:
                current.ClearField(field.name)
            elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
                stack.extend(value if field.is_repeated else [value])
    return out


def check_module(text: str, path: Path, definitions: Definitions) -> None:
    """Refuse to write a module whose objects are not exactly `definitions` (a renderer bug)."""
    if problems := differences(text, path, definitions):
        raise RuntimeError(
            f"the rendered {path.name} does not reproduce the definitions: {'; '.join(problems)}"
        )
