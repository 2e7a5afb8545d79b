"""Hostile and careless input: every one is read correctly, gets a dead letter with its reason
and the original row, or stops the job up front with one line (UserError) that names the fix.
Nothing is lost (rows in = rows written + rows rejected), nothing raises a traceback."""

from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from nlpctr.errors import UserError
from nlpctr.layout import Manifest
from nlpctr.pipelines import ingest, ingest_source, records, source_files
from nlpctr.pipelines.specs import DatasetSpec, load_spec, parse_spec

SPEC: dict[str, Any] = {
    "name": "hostile",
    "source": {"path": "log.csv", "format": "csv"},
    "columns": {"impression_id": "id", "ad_id": "ad", "ad_text": "title"},
    "timestamp": {"column": "ts", "format": "iso8601"},
    "label": {"form": "binary", "clicked": "click"},
    "group": "ad_id",
}
HEADER = ["id", "ad", "title", "ts", "click"]


def rows(n: int, prefix: str = "r") -> list[dict[str, str]]:
    return [
        {"id": f"{prefix}{i}", "ad": f"a{i}", "title": f"Headline {prefix} {i}",
         "ts": "2024-01-01T00:00:00Z", "click": str(i % 2)}
        for i in range(n)
    ]  # fmt: skip


def csv_bytes(records: list[dict[str, str]], header: list[str] = HEADER) -> bytes:
    lines = [",".join(header), *(",".join(r[c] for c in header) for r in records)]
    return ("\n".join(lines) + "\n").encode("utf-8")


def write_source(
    tmp_path: Path, name: str, data: bytes, spec: dict[str, Any] | None = None, **source: Any
) -> Path:
    (tmp_path / name).write_bytes(data)
    spec = dict(spec or SPEC)
    spec["source"] = {"path": name, "format": "csv", **source}
    path = tmp_path / f"{Path(name).stem}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def load(spec: Path) -> DatasetSpec:
    return load_spec(str(spec))


def prepare(spec: Path, out: Path, *flags: str) -> dict[str, Any]:
    return ingest.run(["--dataset", str(spec), "--out", str(out), *flags])


def read_ids(out: Path) -> set[str]:
    return set(ds.dataset(out / "impressions", format="parquet").to_table()["impression_id"].to_pylist())


def read_rejected(out: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in sorted((out / "rejected").glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]


# ------------------------------------------------------------------------------- 2: glob characters


@pytest.mark.filterwarnings("ignore:Possible nested set:FutureWarning")  # ingest filters it; pytest resets
@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_a_source_path_with_glob_characters_reads_that_file(tmp_path: Path, fmt: str) -> None:
    """`base[1].csv` used to be read as a glob: Beam read `base1.csv` (10 rows, not 300)."""

    def write(name: str, records: list[dict[str, str]]) -> None:
        if fmt == "csv":
            (tmp_path / name).write_bytes(csv_bytes(records))
        elif fmt == "jsonl":
            (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in records))
        else:
            pq.write_table(pa.Table.from_pylist(records), tmp_path / name)

    write(f"base[1].{fmt}", rows(30, "named"))
    write(f"base1.{fmt}", rows(10, "glob"))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "source": {"path": f"base[1].{fmt}", "format": fmt}}))
    manifest = prepare(spec, tmp_path / "out")
    assert (manifest["rows_in"], manifest["rows_written"]) == (30, 30)
    assert read_ids(tmp_path / "out") == {f"named{i}" for i in range(30)}
    assert manifest["source"] == str((tmp_path / f"base[1].{fmt}").resolve())

    if fmt != "csv":
        return
    # A name that, read as a glob, matches no file at all (it used to be a traceback).
    (tmp_path / f"base1.{fmt}").rename(tmp_path / f"only*?.{fmt}")
    spec.write_text(yaml.safe_dump({**SPEC, "source": {"path": f"only*?.{fmt}", "format": fmt}}))
    assert prepare(spec, tmp_path / "out2")["rows_written"] == 10


def test_a_source_path_that_is_a_folder_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "source": {"path": "logs", "format": "jsonl"}}))
    with pytest.raises(UserError, match=r"is not a file; point source\.path"):
        prepare(spec, tmp_path / "out")


# ------------------------------------------------------------------------------- 4, 5: long fields

LONG = 200_000  # Python's csv module refused fields over 131,072 characters


def test_a_header_field_over_the_csv_limit_is_read(tmp_path: Path) -> None:
    header = [*HEADER, "x" * LONG]
    data = csv_bytes([{**r, header[-1]: "1"} for r in rows(2)], header)
    spec = load(write_source(tmp_path, "log.csv", data))
    assert ingest_source.source_columns(spec) == header  # was a csv.Error traceback


def test_a_field_over_the_csv_limit_keeps_its_row_and_can_be_truncated() -> None:
    title = "t" * LONG
    data = csv_bytes([{**rows(1)[0], "title": title}, rows(2)[1]])
    parsed = list(source_files.parse_delimited(data, ",", "log.csv"))
    assert [r["title"] for r in parsed] == [title, "Headline r 1"]  # was {"__raw__": ""}
    spec = parse_spec(SPEC, Path("s.yaml"))
    rejected = records.map_record(spec, parsed[0], records.Limits(2000))
    assert isinstance(rejected, records.Rejection) and rejected.reason == records.TEXT_TOO_LONG
    assert json.loads(rejected.to_json())["record"]["title"] == title
    cut = records.map_record(spec, parsed[0], records.Limits(2000, truncate_long_text=True))
    assert isinstance(cut, records.Mapped) and cut.row["ad_text"] == "t" * 2000


def test_a_malformed_row_keeps_its_original_text() -> None:
    data = b'id,ad,title,ts,click\n7,"a,7",x\n8,"unterminated,y,2024,0\n9,a9,z,2024,1\n'
    parsed = list(source_files.parse_delimited(data, ",", "log.csv"))
    assert [p[records.RAW_KEY] for p in parsed] == ['7,"a,7",x', '8,"unterminated,y,2024,0\n9,a9,z,2024,1']
    bad_bytes = list(source_files.parse_delimited(b"a,b\n1,\xff,3\n", ",", "log.csv"))
    assert bad_bytes[0][records.RAW_KEY] == "1,\\udcff,3"  # escaped: it crosses a pipeline boundary


def test_long_fields_end_to_end(tmp_path: Path) -> None:
    header = [*HEADER, "n" * LONG]
    data = csv_bytes([{**r, header[-1]: "v" * LONG} for r in rows(3)], header)
    data += f"9,a9,{'t' * LONG},2024-01-01T00:00:00Z,1,v\n".encode()
    out = tmp_path / "out"
    manifest = prepare(write_source(tmp_path, "log.csv", data), out, "--max-reject-rate", "0.5")
    assert (manifest["rows_in"], manifest["rows_written"]) == (4, 3)
    [dead] = read_rejected(out)
    assert dead["reason"] == records.TEXT_TOO_LONG and dead["record"]["title"] == "t" * LONG


# ------------------------------------------------------------------------------- 4, 6: compression


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_gzip_is_read_by_content_not_by_name(tmp_path: Path, fmt: str) -> None:
    """A gzipped CSV printed its binary bytes as the column list; a plain one named .gz was a
    traceback (Beam went by the name)."""
    plain = csv_bytes(rows(5)) if fmt == "csv" else "".join(json.dumps(r) + "\n" for r in rows(5)).encode()
    for i, (name, data) in enumerate([("plain.gz", plain), (f"zipped.{fmt}", gzip.compress(plain))]):
        spec = tmp_path / f"{i}.yaml"
        spec.write_text(yaml.safe_dump({**SPEC, "source": {"path": name, "format": fmt}}))
        (tmp_path / name).write_bytes(data)
        manifest = prepare(spec, tmp_path / f"out{i}")
        assert (manifest["rows_in"], manifest["rows_written"]) == (5, 5), name


def test_a_gzipped_csv_over_beams_read_buffer_is_read_whole() -> None:
    """Beam's decompressing reader returns at most 16 MiB to a plain read(); the CSV reader
    reads the bytes as they are and unzips them itself."""
    title = "x" * 1000
    data = csv_bytes([{**r, "title": title} for r in rows(20_000)])  # 20 MB
    parsed = list(source_files.parse_delimited(gzip.compress(data, compresslevel=1), ",", "big.csv.gz"))
    assert len(parsed) == 20_000 and all(records.MALFORMED_KEY not in r for r in parsed)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (bz2.compress(b"id,ad\n1,2\n"), "is bzip2-compressed; decompress it"),
        (gzip.compress(b"id,ad,title,ts,click\n" * 1000, mtime=0)[:-40], "is a damaged gzip file"),
    ],
    ids=["bzip2", "damaged-gzip"],
)
def test_other_compression_and_damaged_gzip_are_one_line(tmp_path: Path, data: bytes, message: str) -> None:
    spec = load(write_source(tmp_path, "log.csv", data))
    with pytest.raises(UserError, match=message):
        ingest_source.source_columns(spec)


# ------------------------------------------------------------------------ 6: BOM, types, invisible text


def test_a_csv_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" was refused: "source column 'id' is not in log.csv (it has: \\ufeffid, ...)"."""
    spec = write_source(tmp_path, "log.csv", b"\xef\xbb\xbf" + csv_bytes(rows(4)))
    assert ingest_source.source_columns(load(spec)) == HEADER
    manifest = prepare(spec, tmp_path / "out")
    assert (manifest["rows_in"], manifest["rows_written"]) == (4, 4)
    assert read_ids(tmp_path / "out") == {f"r{i}" for i in range(4)}


def test_a_json_line_with_a_byte_order_mark_is_read() -> None:
    assert source_files.parse_json_line(b'\xef\xbb\xbf{"id": "1"}') == {"id": "1"}
    assert source_files.parse_json_line('\ufeff{"id": "1"}') == {"id": "1"}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"title": {"a": 1}}, records.BAD_TYPE),  # was stored as the text "{'a': 1}"
        ({"title": ["a", "b"]}, records.BAD_TYPE),
        ({"ad": {"id": 7}}, records.BAD_TYPE),
        ({"id": [1]}, records.BAD_TYPE),
        ({"title": "\u200b"}, records.MISSING_TEXT),  # a zero-width space was a headline
        ({"title": " \u200b\u200d\ufeff\u00ad\u2060 "}, records.MISSING_TEXT),
        ({"title": "\u3164\u2800"}, records.MISSING_TEXT),  # Hangul filler, Braille blank
        ({"title": "\u0301"}, records.MISSING_TEXT),  # a combining mark with no base
        ({"ad": "\u200b"}, records.MISSING_ID),
        ({"title": "\u200bok"}, None),
        ({"title": "\x00"}, records.BAD_ENCODING),  # a control character stays corruption
    ],
)
def test_objects_and_invisible_text_are_dead_letters(change: dict[str, Any], reason: str | None) -> None:
    spec = parse_spec({**SPEC, "context": {"slot": "slot"}}, Path("s.yaml"))
    record = {**rows(1)[0], "slot": "top", **change}
    result = records.map_record(spec, record, records.Limits(100))
    if reason is None:
        assert isinstance(result, records.Mapped)
        return
    assert isinstance(result, records.Rejection) and result.reason == reason, result
    assert json.loads(result.to_json())["record"] == records.json_safe(record)


def test_an_object_or_invisible_context_value_is_not_a_category() -> None:
    spec = parse_spec({**SPEC, "context": {"slot": "slot"}}, Path("s.yaml"))
    rejected = records.map_record(spec, {**rows(1)[0], "slot": {"x": 1}}, records.Limits(100))
    assert isinstance(rejected, records.Rejection) and rejected.reason == records.BAD_TYPE
    mapped = records.map_record(spec, {**rows(1)[0], "slot": "\u200b"}, records.Limits(100))
    assert isinstance(mapped, records.Mapped) and mapped.row["slot"] is None


def test_objects_and_invisible_titles_end_to_end(tmp_path: Path) -> None:
    lines = [
        {**r, "title": t} for r, t in zip(rows(4), ["Fine", {"a": 1}, "\u200b", "Also fine"], strict=True)
    ]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "source": {"path": "log.jsonl", "format": "jsonl"}}))
    manifest = prepare(spec, tmp_path / "out", "--max-reject-rate", "0.5")
    assert (manifest["rows_in"], manifest["rows_written"]) == (4, 2)
    assert manifest["rejected_by_reason"] == {records.BAD_TYPE: 1, records.MISSING_TEXT: 1}
    assert sorted(d["record"]["id"] for d in read_rejected(tmp_path / "out")) == ["r1", "r2"]


# ------------------------------------------------------------------------------- 7: id collisions


def test_concat_ids_are_injective_and_plain_values_keep_their_ids() -> None:
    spec = parse_spec(
        {**SPEC, "columns": {**SPEC["columns"], "impression_id": {"concat": ["a", "b"]}}}, Path("s")
    )

    def impression_id(a: str, b: str) -> str:
        result = records.map_record(spec, {**rows(1)[0], "a": a, "b": b}, records.Limits(100))
        assert isinstance(result, records.Mapped)
        return result.row["impression_id"]

    assert impression_id("1", "2:3") != impression_id("1:2", "3")  # both were "1:2:3"
    assert impression_id("a\\", ":b") != impression_id("a\\:", "b")
    assert impression_id("a\\", "b") != impression_id("a", "\\b")
    assert impression_id("17", "4") == "17:4"  # the bundled specs' ids (numbers, UUIDs) do not change
    assert records.concat_id(["1", "2", "3"]) == "1:2:3"


def test_hash_of_refuses_its_separator() -> None:
    spec = parse_spec({**SPEC, "columns": {**SPEC["columns"], "ad_id": {"hash_of": ["a", "b"]}}}, Path("s"))
    result = records.map_record(spec, {**rows(1)[0], "a": "x\x1fy", "b": "z"}, records.Limits(100))
    assert isinstance(result, records.Rejection) and result.reason == records.BAD_ENCODING


def test_concat_collision_no_longer_drops_a_clicked_row(tmp_path: Path) -> None:
    data = b"a,b,ad,title,ts,click\n1,2:3,x,Shown,2024-01-01,0\n1:2,3,y,Clicked,2024-01-01,1\n"
    spec = {**SPEC, "columns": {**SPEC["columns"], "impression_id": {"concat": ["a", "b"]}}}
    manifest = prepare(write_source(tmp_path, "log.csv", data, spec), tmp_path / "out")
    assert (manifest["rows_written"], manifest["rows_rejected"]) == (2, 0)
    assert read_ids(tmp_path / "out") == {"1:2\\:3", "1\\:2:3"}


# ------------------------------------------------------------------------------- 8: unchecked flags


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-reject-rate", "-1"], r"--max-reject-rate -1 is not a fraction between 0 and 1"),
        (["--max-reject-rate", "1.5"], r"--max-reject-rate 1\.5 is not a fraction"),
        (["--max-reject-rate", "nan"], r"--max-reject-rate nan is not a fraction"),
        (["--max-text-chars", "0"], r"--max-text-chars 0 must be at least 1"),
        (["--max-text-chars", "-5"], r"--max-text-chars -5 must be at least 1"),
        (["--num-shards", "-3"], r"--num-shards -3 must be 0"),
    ],
)
def test_meaningless_flags_are_refused_before_the_job_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str
) -> None:
    spec = write_source(tmp_path, "log.csv", csv_bytes(rows(3)))
    monkeypatch.setattr(ingest, "PrepareImpressions", lambda *a, **k: pytest.fail("the job ran"))
    with pytest.raises(UserError, match=message):
        prepare(spec, tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.failed").exists()


def test_an_invalid_strptime_pattern_fails_when_the_spec_loads(tmp_path: Path) -> None:
    for pattern, problem in [
        ("%Y-%m-%Q", "bad directive"),
        ("%Y-%m-%d %", "stray %"),
        ("date", "no % directive"),
    ]:
        spec = {**SPEC, "timestamp": {"column": "ts", "format": "strptime", "pattern": pattern}}
        with pytest.raises(
            UserError, match=rf"timestamp\.pattern: .* is not a strptime pattern \(.*{problem}"
        ):
            parse_spec(spec, Path("s.yaml"))
    good = {**SPEC, "timestamp": {"column": "ts", "format": "strptime", "pattern": "%Y-%m-%d %H:%M %%"}}
    assert parse_spec(good, Path("s.yaml")).timestamp.pattern == "%Y-%m-%d %H:%M %%"


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("log.csv", b"", r"source log\.csv is empty \(no header row\)"),  # was "(it has: )"
        ("log.csv", b"\n\n", r"source log\.csv is empty \(no header row\)"),
        (
            "log.csv",
            csv_bytes([]) + b"\n\n",
            r"source log\.csv has a header row but no rows",
        ),  # was 0 of 0 > 1%
        ("log.csv", gzip.compress(csv_bytes([]), mtime=0), r"has a header row but no rows"),
        ("log.jsonl", b"\n  \n", r"source log\.jsonl is empty"),
    ],
    ids=["empty", "blank-lines", "header-only", "gzipped-header-only", "blank-jsonl"],
)
def test_a_source_with_no_rows_says_so(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    fmt = "jsonl" if name.endswith("jsonl") else "csv"
    spec = write_source(tmp_path, name, data, format=fmt)
    with pytest.raises(
        UserError, match=message + r"; point source\.path in log\.yaml at a log that holds records"
    ):
        ingest_source.source_columns(load(spec))


def test_an_empty_parquet_source_says_so(tmp_path: Path) -> None:
    pq.write_table(
        pa.Table.from_pylist([], schema=pa.schema([(c, pa.string()) for c in HEADER])), tmp_path / "e.parquet"
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "source": {"path": "e.parquet", "format": "parquet"}}))
    with pytest.raises(UserError, match=r"source e\.parquet has no rows"):
        ingest_source.source_columns(load(spec))


def test_every_row_rejected_says_nothing_was_written(tmp_path: Path) -> None:
    """Under --max-reject-rate 1 this said "5 of 5 rows rejected (100.00%) > 100.00%"."""
    data = csv_bytes([{**r, "title": ""} for r in rows(5)])
    with pytest.raises(
        UserError, match=r"^all 5 rows were rejected \(reasons: missing_text=5\); nothing was written"
    ):
        prepare(write_source(tmp_path, "log.csv", data), tmp_path / "out", "--max-reject-rate", "1")
    assert not (tmp_path / "out").exists()
    assert len(read_rejected(tmp_path / "out.failed")) == 5


def test_the_rejection_message_never_shows_a_rate_over_an_equal_limit() -> None:
    manifest = {"rows_in": 100_000, "rows_written": 98_996, "rows_rejected": 1004,
                "rejected_by_reason": {"x": 1004}, "source": "/d/log.csv"}  # fmt: skip
    message = ingest.rejection_message(Manifest.from_json(manifest), 0.01, Path("/o"), Path("/o.failed"))
    assert "(1.0040%) > --max-reject-rate 1.0000%" in message  # not "1.00% > 1.00%"
    no_rows = ingest.rejection_message(
        Manifest.from_json({**manifest, "rows_in": 0, "rows_written": 0}), 0.01, Path("/o"), Path("/f")
    )
    assert no_rows.startswith("source log.csv has no rows; nothing was written to /o")


def test_blank_lines_before_the_header_are_skipped(tmp_path: Path) -> None:
    data = b"\n\r\n" + csv_bytes(rows(2))
    assert ingest_source.source_columns(load(write_source(tmp_path, "log.csv", data))) == HEADER
    assert [r["id"] for r in source_files.parse_delimited(data, ",", "log.csv")] == ["r0", "r1"]


# ------------------------------------------------------------------------------- 9: hostile specs

LAUGHS = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def spec_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    return path


def test_yaml_aliases_are_refused(tmp_path: Path) -> None:
    """Nine lines of aliases are 10**9 strings once expanded (the manifest stores the spec)."""
    good = yaml.safe_dump(SPEC)
    for text in [
        good + LAUGHS,
        good + "notes: &n hi\ndescription: *n\n",
        good.replace("name: hostile", "name: &x h"),
    ]:
        if "*" not in text:
            assert load(spec_text(tmp_path, text)).name == "h"  # an anchor alone is harmless
            continue
        with pytest.raises(
            UserError, match=r"hostile\.yaml: refused: line \d+: YAML aliases \(\*\w+\) are not allowed"
        ):
            load(spec_text(tmp_path, text))


def test_a_spec_over_64_kib_or_nested_deeper_than_32_is_refused(tmp_path: Path) -> None:
    big = yaml.safe_dump({**SPEC, "notes": "x" * 70_000})
    with pytest.raises(UserError, match=r"refused: 70,\d{3} bytes; a spec is at most 64 KiB"):
        load(spec_text(tmp_path, big))
    deep = yaml.safe_dump(SPEC) + "notes: " + "[" * 10_000 + "]" * 10_000 + "\n"  # was a RecursionError
    with pytest.raises(UserError, match=r"refused: line \d+: nested more than 32 levels deep"):
        load(spec_text(tmp_path, deep))


def test_errors_name_the_column_and_the_file_never_its_content(tmp_path: Path) -> None:
    """A spec pointed at /etc/passwd echoed its first line in the error."""
    secret = b"root:x:0:0:secret-token-123:/root:/bin/bash\nuser:x:1000:1000::/home/user:/bin/sh\n"
    spec = load(write_source(tmp_path, "passwd", secret))
    with pytest.raises(UserError) as info:
        spec.check_source_columns(ingest_source.source_columns(spec) or [])
    message = str(info.value)
    assert "secret" not in message and "root" not in message
    assert (
        "source column 'ad' is not in passwd (its header has 1 column; if it has more, source.delimiter"
        in message
    )

    bad_yaml = spec_text(tmp_path, "name: ok\ncolumns: {a: b\npassword: hunter2 secret\n")
    with pytest.raises(UserError, match=r"not valid YAML \(.* at line \d+, column \d+\)") as info:
        load(bad_yaml)
    assert "hunter2" not in str(info.value)
    (tmp_path / "latin1.yaml").write_bytes(b"name: \xff\n")
    with pytest.raises(UserError, match=r"not valid YAML \(not UTF-8 at byte 6\); save it as UTF-8"):
        load(tmp_path / "latin1.yaml")


def test_long_spec_values_are_cut_in_errors(tmp_path: Path) -> None:
    spec = {**SPEC, "timestamp": {"column": "ts", "format": "x" * 5000}}
    with pytest.raises(UserError) as info:
        parse_spec(spec, Path("s.yaml"))
    assert len(str(info.value)) < 300 and "timestamp.format: 'xxx" in str(info.value)


def test_a_column_the_spec_reads_twice_in_the_header_is_refused(tmp_path: Path) -> None:
    """`id,ad,title,ts,click,title`: the last (empty) title silently won, the real one was lost."""
    data = b"id,ad,title,ts,click,title\n1,a,Real title,2024-01-01T00:00:00Z,1,\n"
    spec = load(write_source(tmp_path, "log.csv", data))
    with pytest.raises(
        UserError, match=r"source column 'title' appears 2 times in the header of log\.csv; rename"
    ):
        spec.check_source_columns(ingest_source.source_columns(spec) or [])
    spec.check_source_columns([*HEADER, "unused", "unused"])  # a copy the spec does not read is harmless


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--dataset", "x", "--out", "o", "--max-text-chars", "abc"],
            "argument --max-text-chars: invalid int value",
        ),
        (["--dataset", "x"], "the following arguments are required: --out"),
        (["--dataset", "x", "--out", "o", "--split-mode", "random"], "argument --split-mode: invalid choice"),
    ],
)
def test_flags_that_do_not_parse_are_one_line(argv: list[str], message: str) -> None:
    """argparse printed its usage and exited (SystemExit), not one line naming the flag."""
    with pytest.raises(
        UserError, match=rf"^nlpctr data prepare: {message}.*; see nlpctr data prepare --help$"
    ):
        ingest.run(argv)
