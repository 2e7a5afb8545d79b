"""Row-level validation: each kind of bad row gets its reason code; good rows map exactly."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pytest
import yaml

from nlpctr.models.schema import text_id
from nlpctr.pipelines import records as r
from nlpctr.pipelines import source_files
from nlpctr.pipelines.specs import load_spec
from nlpctr.pipelines.text_repair import fix_mojibake, strip_html

AGGREGATED = {
    "name": "agg",
    "source": {"path": "log.csv", "format": "csv"},
    "columns": {
        "impression_id": "id",
        "ad_id": "ad",
        "ad_text": "title",
    },
    "numeric": {"bid": "bid", "views": {"column": "views", "log1p": True, "optional": True}},
    "context": {"test_id": "test"},
    "timestamp": {"column": "ts", "format": "iso8601"},
    "label": {"form": "aggregated", "impressions": "n", "clicks": "k"},
    "group": "test_id",
    "max_text_chars": 40,
}
GOOD_ROW = {"id": "1", "ad": "a1", "title": "Ten Dogs", "body": "", "test": "t1",
            "ts": "2024-01-02T03:04:05", "n": "10", "k": "3", "bid": "0.25", "views": 9}  # fmt: skip


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("spec") / "agg.yaml"
    path.write_text(yaml.safe_dump(AGGREGATED))
    return load_spec(str(path))


def test_good_row_maps_onto_schema(spec) -> None:
    mapped = r.map_record(spec, GOOD_ROW, r.Limits(40))
    assert isinstance(mapped, r.Mapped)
    row = mapped.row
    assert row["event_timestamp"] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert (row["impressions"], row["clicks"]) == (10, 3)
    assert row["ad_text_id"] == text_id("ten  dogs")
    assert row["bid"] == 0.25 and row["views"] == pytest.approx(math.log(10))
    assert row["query_text_id"] is None and row["test_id"] == "t1"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"title": "  "}, r.MISSING_TEXT),
        ({"title": None}, r.MISSING_TEXT),
        ({"ts": "yesterday"}, r.BAD_TIMESTAMP),
        ({"ts": ""}, r.BAD_TIMESTAMP),
        ({"k": "11"}, r.CLICKS_GT_IMPRESSIONS),
        ({"n": "-1"}, r.BAD_COUNT),
        ({"n": "2.5"}, r.BAD_COUNT),
        ({"k": "three"}, r.BAD_COUNT),
        ({"n": "0", "k": "0"}, r.ZERO_IMPRESSIONS),
        ({"title": "bad\x00byte"}, r.BAD_ENCODING),
        ({"title": "caf\udce9"}, r.BAD_ENCODING),
        ({"title": "x" * 41}, r.TEXT_TOO_LONG),
        ({"ad": ""}, r.MISSING_ID),
        ({"bid": None}, r.BAD_NUMERIC),  # missing, and the feature is not optional
        ({"bid": "1,5"}, r.BAD_NUMERIC),
        ({"bid": "nan"}, r.BAD_NUMERIC),
        ({"bid": float("nan")}, r.BAD_NUMERIC),
        ({"bid": "1e400"}, r.BAD_NUMERIC),  # parses to inf
        ({"bid": float("-inf")}, r.BAD_NUMERIC),
        ({"bid": 3e15}, r.BAD_NUMERIC),  # absurdly large
        ({"bid": 2**70}, r.BAD_NUMERIC),
        ({"bid": True}, r.BAD_NUMERIC),
        ({"bid": [1.0]}, r.BAD_NUMERIC),
        ({"views": -1}, r.BAD_NUMERIC),  # negative under log1p
    ],
)
def test_bad_rows_get_their_reason(spec, change: dict, reason: str) -> None:
    result = r.map_record(spec, {**GOOD_ROW, **change}, r.Limits(40))
    assert isinstance(result, r.Rejection)
    assert result.reason == reason, result.message
    assert r.json_safe(result.record)  # the original row survives into the dead letter


def test_numeric_values_parse_and_an_optional_one_may_be_missing(spec) -> None:
    for raw, value in (("  -2.5e1 ", -25.0), (7, 7.0), (".5", 0.5), ("3.", 3.0)):
        result = r.map_record(spec, {**GOOD_ROW, "bid": raw}, r.Limits(40))
        assert isinstance(result, r.Mapped) and result.row["bid"] == value
    missing = r.map_record(spec, {**GOOD_ROW, "views": ""}, r.Limits(40))
    assert isinstance(missing, r.Mapped) and missing.row["views"] is None
    rejected = r.map_record(spec, {**GOOD_ROW, "views": -0.5}, r.Limits(40))
    assert isinstance(rejected, r.Rejection) and "log1p" in rejected.message


def test_long_text_is_truncated_only_under_the_flag(spec) -> None:
    result = r.map_record(spec, {**GOOD_ROW, "title": "y" * 50}, r.Limits(40, truncate_long_text=True))
    assert isinstance(result, r.Mapped)
    assert result.row["ad_text"] == "y" * 40 and result.truncated == ("ad_text",)


def test_hashed_ids_carry_the_string_they_were_hashed_from(tmp_path: Path) -> None:
    """hash_of: the parts joined as stable_hash joins them; text_id_of: the normalised text
    (spellings that normalise alike give one pre-image); copied and concat ids: none."""
    raw = {
        **AGGREGATED,
        "columns": {
            "impression_id": {"concat": ["id", "test"]},
            "query_id": {"text_id_of": "query"},
            "query_text": "query",
            "ad_id": {"hash_of": ["title", "test"]},
            "ad_text": "title",
        },
        "context": {"test_id": "test", "title_key": {"text_id_of": "title"}},
    }
    path = tmp_path / "hashed.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_spec(str(path))
    mapped = r.map_record(spec, {**GOOD_ROW, "query": "  Big  DOGS "}, r.Limits(40))
    assert isinstance(mapped, r.Mapped)
    assert dict(mapped.hashed) == {"query_id": "big dogs", "ad_id": "Ten Dogs\x1ft1", "title_key": "ten dogs"}
    assert mapped.row["query_id"] == text_id("big dogs") and mapped.row["title_key"] == text_id("Ten Dogs")
    # No impression id in the spec: the record's content is hashed, and is the pre-image.
    del raw["columns"]["impression_id"]
    path.write_text(yaml.safe_dump(raw))
    content = r.map_record(load_spec(str(path)), {**GOOD_ROW, "query": "cats"}, r.Limits(40))
    assert isinstance(content, r.Mapped)
    assert content.row["impression_id"] == r.stable_hash(dict(content.hashed)["impression_id"])


def test_integral_floats_are_counts_and_ids() -> None:
    assert r.parse_count(3.0, "n") == 3
    assert r.as_text(201446.0) == "201446"
    with pytest.raises(r._Invalid):
        r.parse_count(True, "n")


def test_timestamp_formats() -> None:
    from nlpctr.pipelines.spec_rules import TimestampRule

    def ts(fmt: str, value: object, **kw: object) -> dt.datetime:
        return r.parse_timestamp(TimestampRule(format=fmt, column="c", **kw), {"c": value})

    # strftime %Y%W: week 00 of 2015 and week 52 of 2014 are the same Monday.
    assert ts("year_week", 201500) == ts("year_week", "201452") == dt.datetime(2014, 12, 29, tzinfo=dt.UTC)
    assert ts("iso_week", "201501") == dt.datetime(2014, 12, 29, tzinfo=dt.UTC)
    assert ts("epoch_ms", 1717527762025).year == 2024
    assert ts("iso8601", "2024-06-01T00:00:00+02:00") == dt.datetime(2024, 5, 31, 22, tzinfo=dt.UTC)
    naive_berlin = ts("iso8601", "2024-06-01T00:00:00", timezone="Europe/Berlin")
    assert naive_berlin == dt.datetime(2024, 5, 31, 22, tzinfo=dt.UTC)
    with pytest.raises(r._Invalid):
        ts("iso_week", "201500")  # ISO has no week 00


def test_delimited_parser_flags_ragged_rows_and_keeps_quoted_newlines() -> None:
    data = b'a,b\n1,"two\nlines"\n3\n4,5\n'
    rows = list(source_files.parse_delimited(data, ",", "f.csv"))
    assert rows[0] == {"a": "1", "b": "two\nlines"}
    assert r.MALFORMED_KEY in rows[1] and "1 fields, header has 2" in rows[1][r.MALFORMED_KEY]
    assert rows[2] == {"a": "4", "b": "5"}


def test_json_line_parser() -> None:
    assert source_files.parse_json_line(b"  ") is None
    assert r.MALFORMED_KEY in source_files.parse_json_line(b"{oops")
    assert r.MALFORMED_KEY in source_files.parse_json_line(b"[1, 2]")
    assert "UTF-8" in source_files.parse_json_line(b'{"a": "\xff"}')[r.MALFORMED_KEY]


def test_fix_mojibake_repairs_what_it_can() -> None:
    assert fix_mojibake("Product \u0096 Scooters") == "Product – Scooters"
    assert fix_mojibake("Power\u00e2\u0084\u00a2") == "Power™"
    assert fix_mojibake("café naïve") == "café naïve"
    assert "\u0081" in fix_mojibake("x\u0081y")  # undefined in cp1252: left for rejection


def test_strip_html() -> None:
    assert strip_html("<p>When I saw <em>why</em> &mdash; wow</p>\n<p>ok</p>") == "When I saw why — wow ok"


def test_spec_dir_is_package_data() -> None:
    assert (Path(r.__file__).parent / "specs" / "upworthy.yaml").is_file()


def test_row_types_name_the_fields_of_their_schemas() -> None:
    """A TypedDict and the pyarrow schema (or writer) of the same rows must not drift apart."""
    from nlpctr.models.recipe import BUDGET_KEYS, StageBudget
    from nlpctr.models.schema import ImpressionRow, impression_schema
    from nlpctr.pipelines.ctr_stats import CtrHistoryRow, row_schema

    typed = ImpressionRow.__required_keys__ | ImpressionRow.__optional_keys__
    assert typed == set(impression_schema([]).names)
    assert ImpressionRow.__optional_keys__ == {"split"}  # set when the row is assigned one
    assert set(CtrHistoryRow.__annotations__) == set(row_schema([]).names)
    letter = json.loads(r.Rejection(r.MISSING_ID, "m", {"a": 1}).to_json())
    assert set(letter) == set(r.DeadLetter.__annotations__)
    assert tuple(StageBudget.__annotations__) == BUDGET_KEYS
