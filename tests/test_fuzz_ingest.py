"""Fuzzing the ingest parser and the spec loader (hypothesis, derandomised so CI is repeatable).

Whatever a source row holds (wrong types, None, huge integers, NaN/inf, odd unicode, lone
surrogates, timestamps in odd formats), `map_record` gives a row that fits the canonical
schema or a dead letter with a reason code, never an exception. Whatever a spec holds, the
loader gives a spec or a UserError.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import math
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from nlpctr.errors import UserError
from nlpctr.models.schema import impression_schema
from nlpctr.pipelines import records as r
from nlpctr.pipelines import source_files
from nlpctr.pipelines.spec_rules import LABEL_FORMS, TIMESTAMP_FORMATS
from nlpctr.pipelines.specs import DatasetSpec, load_spec, parse_spec

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
SPEC_PATH = Path("fuzz.yaml")

# One spec per timestamp format and label form, between them every kind of column rule.
BASE_SPEC: dict[str, Any] = {
    "name": "fuzz",
    "source": {"path": "/nowhere/log.csv", "format": "csv"},
    "columns": {
        "impression_id": "id",
        "query_id": {"text_id_of": "q"},
        "query_text": {"column": "q", "transform": ["fix_mojibake"]},
        "ad_id": {"hash_of": ["title", "test"]},
        "ad_text": {"column": "title", "transform": ["strip_html", "fix_mojibake"]},
    },
    "context": {"test_id": "test", "slot": {"concat": ["test", "pos"]}},
    "timestamp": {"column": "ts", "format": "iso8601", "timezone": "Europe/Berlin"},
    "label": {"form": "aggregated", "impressions": "n", "clicks": "k"},
    "group": "test_id",
    "entities": ["ad_id", "test_id"],
    "max_text_chars": 50,
}
TIMESTAMPS: list[dict[str, Any]] = [
    {"column": "ts", "format": "iso8601", "timezone": "Europe/Berlin"},
    {"column": "ts", "format": "iso_week"},
    {"column": "ts", "format": "year_week"},
    {"column": "ts", "format": "epoch_s"},
    {"column": "ts", "format": "epoch_ms", "timezone": "America/New_York"},
    {"column": "ts", "format": "strptime", "pattern": "%Y-%m-%d %H:%M"},
    {"format": "offset", "base": "2020-01-01T00:00:00", "offsets": {"ts": 1, "n": 86400}},
]
LABELS: list[dict[str, Any]] = [
    {"form": "aggregated", "impressions": "n", "clicks": "k"},
    {"form": "binary", "clicked": "k"},
]
SPECS: list[DatasetSpec] = [
    parse_spec({**BASE_SPEC, "timestamp": ts, "label": label}, SPEC_PATH)
    for ts in TIMESTAMPS
    for label in LABELS
]
SOURCE_COLUMNS = sorted(set().union(*(s.source_columns() for s in SPECS)))


def power_of_ten(exponent: int) -> int:
    """±10**|exponent| (a strategy's repr would choke on the literal)."""
    return (1 if exponent > 0 else -1) * 10 ** abs(exponent)


# Odd text: every code point category, lone surrogates and C0/C1 controls included.
odd_text = st.text(st.characters(exclude_categories=()), max_size=60)
texts = st.one_of(
    odd_text,
    st.sampled_from(["", " ", "\t\n", "<b>&amp;</b>", "<<<", "â€\x9d", "caf\udce9", "\x00", "\u200b", "ǅ"]),
)
odd_timestamps = st.sampled_from(
    [
        "2024-01-02T03:04:05Z", "2024-01-02 03:04", "2024-13-45T99:99", "0001-01-01T00:00:00+05:00",
        "9999-12-31T23:59:59-05:00", "1969-12-31T23:59:59Z", "2201-01-01", "201453", "201400", "000001",
        "999999", "1e20", "-1e20", "1717527762025", "NaN", "inf", "0x10", "٢٠٢٤-٠١-٠٢", "2024-W01-1",
        "Mon, 01 Jan 2024 00:00:00 GMT", "2024-01-02T03:04:05.123456789+00:00", "  ", "24:00",
    ]
)  # fmt: skip
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63, 2**63 - 1, -(2**63), 10**30]),
    st.sampled_from([5000, -5000]).map(power_of_ten),  # beyond str()'s 4300-digit limit
    st.floats(),  # NaN, inf, -0.0, subnormals, 1e308
    texts,
    st.sampled_from(["1" * 5000, "1" * 20, "+3", " 7 ", "3.000", "-0", "1e3", "1_000", "１２"]),
    odd_timestamps,
    st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
    st.dates(),
    st.binary(max_size=20),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
# Plausible values per source column; a record starts from these so that most get far into
# the mapping (and some map), then a few of its fields are replaced by anything at all.
plain_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), min_size=1, max_size=70)
GOOD_TIMESTAMPS = {
    "iso8601": st.datetimes(min_value=dt.datetime(1971, 1, 1)).map(dt.datetime.isoformat),
    "iso_week": st.integers(1971, 2199).map(lambda year: f"{year}01"),
    "year_week": st.integers(1971, 2199).map(lambda year: f"{year}01"),
    "epoch_s": st.floats(0, 7e9),
    "epoch_ms": st.integers(0, 7 * 10**12),
    "strptime": st.datetimes(min_value=dt.datetime(1971, 1, 1)).map(lambda t: f"{t:%Y-%m-%d %H:%M}"),
    "offset": st.integers(0, 10**6),
}


@st.composite
def source_records(draw: st.DrawFn, spec: DatasetSpec) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": draw(st.one_of(plain_text, st.integers())),
        "q": draw(plain_text),
        "title": draw(plain_text),
        "body": draw(st.one_of(st.none(), plain_text)),
        "test": draw(plain_text),
        "pos": draw(st.integers(1, 10)),
        "ts": draw(GOOD_TIMESTAMPS[spec.timestamp.format]),
        "n": draw(st.one_of(st.integers(1, 1000), st.sampled_from([2**63 - 1, 2**63, 2**70]))),
        "k": draw(st.sampled_from([0, 1, "1", "true", 2**64])),
    }
    for column in draw(st.sets(st.sampled_from([*SOURCE_COLUMNS, "extra"]), max_size=3)):
        if draw(st.booleans()):
            record[column] = draw(values)
        else:
            record.pop(column, None)
    return record


def assert_row_or_dead_letter(spec: DatasetSpec, record: dict[str, Any], limits: r.Limits) -> None:
    result = r.map_record(spec, record, limits)
    event(result.reason if isinstance(result, r.Rejection) else "row")  # --hypothesis-show-statistics
    if isinstance(result, r.Rejection):
        assert result.reason in r.REASONS
        assert result.message
        result.to_json()  # the dead letter itself can be written
        return
    assert isinstance(result, r.Mapped)
    row = result.row
    # A valid row fits the canonical schema exactly (the ingest writer's schema).
    pa.Table.from_pylist([{**row, "split": "train"}], schema=impression_schema(spec.context_columns))
    assert row["event_timestamp"].tzinfo is not None and 1970 <= row["event_timestamp"].year <= 2200
    assert 0 <= row["clicks"] <= row["impressions"] and row["impressions"] >= 1
    assert row["ad_text"] and row["ad_id"] and row["impression_id"]
    assert len(row["ad_text"]) <= limits.max_text_chars


@FUZZ
@given(spec_and_record=st.sampled_from(SPECS).flatmap(lambda s: st.tuples(st.just(s), source_records(s))))
def test_any_record_maps_to_a_row_or_a_dead_letter(
    spec_and_record: tuple[DatasetSpec, dict[str, Any]],
) -> None:
    spec, record = spec_and_record
    for truncate in (False, True):
        assert_row_or_dead_letter(spec, record, r.Limits(spec.max_text_chars, truncate_long_text=truncate))


@FUZZ
@given(
    rule=st.sampled_from(SPECS).map(lambda spec: spec.timestamp),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "Pacific/Kiritimati", "America/St_Johns"]),
    value=st.one_of(
        odd_timestamps,
        st.datetimes(timezones=st.one_of(st.none(), st.timezones())),
        st.datetimes(timezones=st.one_of(st.none(), st.timezones())).map(dt.datetime.isoformat),
        st.floats(),
        st.integers(min_value=-(2**70), max_value=2**70),
        values,
    ),
)
def test_any_timestamp_parses_or_is_bad_timestamp(rule: r.TimestampRule, zone: str, value: Any) -> None:
    """Every format, read in zones at odd offsets: an aware UTC time in range, or bad_timestamp."""
    rule = dataclasses.replace(rule, timezone=zone)
    try:
        stamp = r.parse_timestamp(rule, {"ts": value, "n": value})
    except r._Invalid as invalid:
        # (an integer too long to print is malformed before it is a bad time)
        assert invalid.reason in (r.BAD_TIMESTAMP, r.MALFORMED_RECORD)
        return
    assert stamp.utcoffset() == dt.timedelta(0) and 1970 <= stamp.year <= 2200


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(st.lists(texts, min_size=1, max_size=7), max_size=5).map(
            lambda rows: "\n".join(",".join(row) for row in rows).encode("utf-8", "surrogatepass")
        ),
    ),
    delimiter=st.sampled_from([",", "\t", ";"]),
)
def test_any_delimited_bytes_parse_to_records_or_malformed(data: bytes, delimiter: str) -> None:
    header = b"id,q,title,body,test,pos,ts,n,k\n".replace(b",", delimiter.encode())
    for source in (data, header + data):
        for record in source_files.parse_delimited(source, delimiter, "fuzz.csv"):
            assert isinstance(record, dict)
            assert_row_or_dead_letter(SPECS[0], record, r.Limits(50))


@FUZZ
@given(
    line=st.one_of(
        st.binary(max_size=200),
        odd_text,
        st.dictionaries(st.sampled_from(SOURCE_COLUMNS), values).map(lambda d: json.dumps(r.json_safe(d))),
    )
)
def test_any_json_line_parses_to_a_record_or_malformed(line: bytes | str) -> None:
    record = source_files.parse_json_line(line)
    if record is not None:
        assert isinstance(record, dict)
        assert_row_or_dead_letter(SPECS[1], record, r.Limits(50))


# ------------------------------------------------------------------------------- specs

yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["", "ad_id", "test_id", "q", "ts", "csv", "iso8601", "offset", "binary", "UTC"]),
    st.dates(),
)
yaml_values = st.recursive(
    yaml_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers(), st.booleans()), inner, max_size=4),
    ),
    max_leaves=8,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, inner in value.items():
            out += _paths(inner, (*prefix, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value):
            out += _paths(inner, (*prefix, i))
    return out


SPEC_PATHS = _paths({**BASE_SPEC, "timestamp": TIMESTAMPS[-1]})


@st.composite
def mutated_specs(draw: st.DrawFn) -> Any:
    """A valid spec with a few fields replaced, deleted or added: close enough to valid that
    the loader's later checks run, not only its first one."""
    spec = copy.deepcopy({**BASE_SPEC, "timestamp": draw(st.sampled_from(TIMESTAMPS))})
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(SPEC_PATHS))
        parent = spec
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(["replace", "delete", "add"]))
            if action == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif action == "add" and isinstance(parent, dict):
                parent[draw(st.one_of(st.text(max_size=8), st.integers()))] = draw(yaml_values)
            else:
                parent[path[-1]] = draw(yaml_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or retyped this path
    return spec


def assert_spec_or_user_error(load: Any) -> None:
    try:
        spec = load()
    except UserError as error:
        assert str(error) and "\n" not in str(error)
        event("UserError")
        return
    event("loaded")
    # What ingest does next with a loaded spec must not raise anything else either.
    assert len(spec.spec_hash) == 16
    columns = sorted(spec.source_columns())
    spec.check_source_columns(columns)
    with pytest.raises(UserError):
        spec.check_source_columns(columns[1:])
    impression_schema(spec.context_columns)


@FUZZ
@given(raw=st.one_of(mutated_specs(), mutated_specs(), yaml_values))
def test_any_spec_mapping_loads_or_is_a_user_error(raw: Any) -> None:
    assert_spec_or_user_error(lambda: parse_spec(raw, SPEC_PATH))


@FUZZ
@given(
    text=st.one_of(
        odd_text,
        mutated_specs().map(lambda s: yaml.safe_dump(s, allow_unicode=True)),
        st.sampled_from(
            ["a: [", "{", "- - -", "? [a]\n: 1", "!!python/object:os.system x", "\t\x00", "a: *x"]
        ),
    )
)
def test_any_spec_file_loads_or_is_a_user_error(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz_spec.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    assert_spec_or_user_error(lambda: load_spec(str(path)))


def test_fuzzed_specs_cover_every_format() -> None:
    assert {s.timestamp.format for s in SPECS} == set(TIMESTAMP_FORMATS)
    assert {s.label.form for s in SPECS} == set(LABEL_FORMS)


@pytest.mark.parametrize("name", ["", "nope", "a\x00b", "../" * 3, "~nobody_here/x.yaml", "x" * 5000])
def test_unknown_spec_name_is_a_user_error(name: str) -> None:
    with pytest.raises(UserError, match="neither a bundled dataset"):
        load_spec(name)


# What the fuzzers found (or would have): each was a TypeError or a silent acceptance before.
@pytest.mark.parametrize(
    ("change", "where"),
    [
        ({"split": {"fractions": 1}}, "split.fractions"),
        ({"split": {"fractions": [math.nan, 0, 0]}}, "split.fractions"),
        ({"group": ["test_id"]}, "group"),
        ({"context": {True: "test"}, "group": "ad_id"}, "context.True"),
        ({"timestamp": {"column": "ts", "format": "iso8601", "timezone": "Mars/Base"}}, "timestamp.timezone"),
        ({"timestamp": {"format": "offset", "base": "yesterday", "offsets": {"ts": 1}}}, "timestamp.base"),
        ({"timestamp": {"format": "offset", "base": "2020-01-01", "offsets": {1: 1}}}, "timestamp.offsets"),
        (
            {"timestamp": {"format": "offset", "base": "2020-01-01", "offsets": {"ts": math.inf}}},
            "timestamp.offsets.ts",
        ),
        ({"notes": {1: "a", "b": 2}}, "notes"),
        ({"max_text_chars": True}, "max_text_chars"),
        ({"": None, 0: None}, "top level"),
    ],
)
def test_spec_fields_that_used_to_escape(change: dict[Any, Any], where: str) -> None:
    with pytest.raises(UserError, match=f"spec fuzz.yaml: {re.escape(where)}"):
        parse_spec(copy.deepcopy(BASE_SPEC) | change, SPEC_PATH)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"q": "caf\udce9"}, r.BAD_ENCODING),  # hashed into query_id (text_id_of)
        ({"test": "\ud800"}, r.BAD_ENCODING),  # hashed into ad_id (hash_of)
        ({"id": power_of_ten(5000)}, r.MALFORMED_RECORD),  # str() refuses it
        ({"ts": "0001-01-01T00:00:00+05:00"}, r.BAD_TIMESTAMP),  # overflows converting to UTC
        ({"n": 2**64, "k": 1}, r.BAD_COUNT),  # beyond the int64 column: the writer would crash
    ],
)
def test_rows_that_used_to_escape(change: dict[str, Any], reason: str) -> None:
    good = {"id": "1", "q": "query", "title": "Ad", "body": "", "test": "t", "pos": "1",
            "ts": "2024-01-02T03:04:05", "n": 3, "k": 1}  # fmt: skip
    assert isinstance(r.map_record(SPECS[0], good, r.Limits(50)), r.Mapped)
    result = r.map_record(SPECS[0], good | change, r.Limits(50))
    assert isinstance(result, r.Rejection) and result.reason == reason, result
    result.to_json()
