"""The Beam ingest job end to end: bundled datasets, every reject reason, splits, atomic output."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from nlpctr.errors import UserError
from nlpctr.models.schema import SPLITS, impression_schema, stable_hash
from nlpctr.pipelines import ingest, ingest_source, ingest_validate, records
from nlpctr.pipelines.specs import load_spec

BAD_CSV = """id,ad,title,ts,n,k,test
1,a1,Good headline one,2024-01-01T00:00:00Z,10,2,t1
2,a2,Good headline two,2024-01-02T00:00:00Z,5,0,t1
3,a3,,2024-01-02T00:00:00Z,5,0,t2
4,a4,Bad time,not a time,5,0,t2
5,a5,Too many clicks,2024-01-03T00:00:00Z,5,6,t2
6,a6,Negative,2024-01-03T00:00:00Z,-5,0,t3
7,a7,Fraction,2024-01-03T00:00:00Z,2.5,0,t3
8,a8,Zero,2024-01-03T00:00:00Z,0,0,t3
9,a9,Control \x01 char,2024-01-03T00:00:00Z,5,1,t4
10,a10,Invalid \xff byte,2024-01-03T00:00:00Z,5,1,t4
1,a1,Duplicate of one,2024-01-01T00:00:00Z,10,2,t1
12,a12,This headline is far too long for the limit,2024-01-03T00:00:00Z,5,1,t5
13,a13,ragged row
14,a14,Good headline three,2024-01-04T00:00:00Z,7,7,t5
"""
EXPECTED_REASONS = {
    records.MISSING_TEXT: 1, records.BAD_TIMESTAMP: 1, records.CLICKS_GT_IMPRESSIONS: 1, records.BAD_COUNT: 2,
    records.ZERO_IMPRESSIONS: 1, records.BAD_ENCODING: 2, records.DUPLICATE_IMPRESSION_ID: 1,
    records.TEXT_TOO_LONG: 1, records.MALFORMED_RECORD: 1,
}  # fmt: skip
SPEC = {
    "name": "badlog",
    "source": {"path": "log.csv", "format": "csv"},
    "columns": {"impression_id": "id", "ad_id": "ad", "ad_text": "title"},
    "context": {"test_id": "test"},
    "timestamp": {"column": "ts", "format": "iso8601"},
    "label": {"form": "aggregated", "impressions": "n", "clicks": "k"},
    "group": "test_id",
    "max_text_chars": 30,
}


def make_log(tmp_path: Path, spec: dict = SPEC, csv: str = BAD_CSV) -> Path:
    (tmp_path / "log.csv").write_bytes(csv.encode("latin-1"))
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def read_rows(out: Path) -> list[dict]:
    table = ds.dataset(out / "impressions", format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda row: row["impression_id"])


def read_rejected(out: Path) -> list[dict]:
    lines = [line for f in sorted((out / "rejected").glob("*.jsonl")) for line in f.read_text().splitlines()]
    return sorted((json.loads(line) for line in lines), key=json.dumps)


def test_every_reason_is_a_dead_letter_and_counts_add_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = ingest.run(["--dataset", str(make_log(tmp_path)), "--out", str(out), "--max-reject-rate", "1"])
    assert manifest["rows_in"] == 14
    assert manifest["rows_written"] == 3
    assert manifest["rows_in"] == manifest["rows_written"] + manifest["rows_rejected"]
    assert manifest["rejected_by_reason"] == EXPECTED_REASONS
    rejected = read_rejected(out)
    assert len(rejected) == manifest["rows_rejected"]
    assert all(set(r) == {"reason", "message", "record"} and r["message"] for r in rejected)
    duplicate = next(r for r in rejected if r["reason"] == records.DUPLICATE_IMPRESSION_ID)
    # The original source row (the copy with the larger content), not the mapped one.
    assert duplicate["record"] == dict(
        zip(BAD_CSV.splitlines()[0].split(","), BAD_CSV.splitlines()[1].split(","), strict=True)
    )
    assert json.loads((out / "manifest.json").read_text())["rows_written"] == 3
    assert pq.read_schema(
        next((out / "impressions").glob("*.parquet"))
    ).remove_metadata() == impression_schema(["test_id"])
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_long_text_truncated_under_the_flag_is_counted(tmp_path: Path) -> None:
    out = tmp_path / "out"
    manifest = ingest.run(
        [
            "--dataset",
            str(make_log(tmp_path)),
            "--out",
            str(out),
            "--max-reject-rate",
            "1",
            "--truncate-long-text",
        ]
    )
    assert manifest["rows_truncated"] == {"ad_text": 1}
    assert records.TEXT_TOO_LONG not in manifest["rejected_by_reason"]
    assert any(len(row["ad_text"]) == 30 for row in read_rows(out))


def test_reject_rate_over_the_limit_fails_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"rows rejected .* > --max-reject-rate 1.00%.*nothing was written"):
        ingest.run(["--dataset", str(make_log(tmp_path)), "--out", str(out)])
    assert not out.exists()
    assert (tmp_path / "out.failed" / "rejected").is_dir()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_crash_mid_run_leaves_previous_output_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    spec = make_log(tmp_path)
    ingest.run(["--dataset", str(spec), "--out", str(out), "--max-reject-rate", "1"])
    before = read_rows(out)

    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("worker died")

    monkeypatch.setattr(ingest_validate, "map_record", explode)
    with pytest.raises(Exception, match="worker died"):
        ingest.run(["--dataset", str(spec), "--out", str(out), "--max-reject-rate", "1"])
    assert read_rows(out) == before
    assert not list(tmp_path.glob(".out.*"))


def test_upworthy_all_packages_in(tmp_path: Path) -> None:
    out = tmp_path / "upworthy"
    manifest = ingest.run(["--dataset", "upworthy", "--out", str(out), "--seed", "7"])
    assert manifest["rows_in"] == 22666
    assert manifest["rows_written"] + manifest["rows_rejected"] == 22666
    # ad_id = hash_of(headline, test): packages sharing both share the id, which is no collision.
    assert manifest["id_hash_collisions"] == {}
    assert records.ID_HASH_COLLISION not in manifest["rejected_by_reason"]
    assert sum(manifest["split"]["rows"].values()) == manifest["rows_written"]
    assert sum(manifest["split"]["impressions"].values()) == 81_024_151 or manifest["rows_rejected"] > 0
    rows = read_rows(out)
    first = next(row for row in rows if row["impression_id"] == "0")
    assert first["ad_id"] == stable_hash(first["ad_text"], first["test_id"])
    assert "ad_extra_text" not in first  # refused by the spec loader: nothing read it
    assert first["event_timestamp"].weekday() == 0  # Monday 00:00 UTC of its week
    assert not {"significance", "winner", "ctr"} & set(rows[0])
    # within_group: the packages of one test fall across splits
    splits_per_test: dict[str, set[str]] = {}
    for row in rows:
        splits_per_test.setdefault(row["test_id"], set()).add(row["split"])
    assert sum(len(s) > 1 for s in splits_per_test.values()) > 1000


def test_trec_and_esci(tmp_path: Path) -> None:
    trec = ingest.run(["--dataset", "trec2013", "--out", str(tmp_path / "trec")])
    assert trec["rows_in"] == 4449
    assert trec["rejected_by_reason"][records.MISSING_TEXT] == 53
    rows = read_rows(tmp_path / "trec")
    assert {row["impressions"] for row in rows} == {1} and {row["clicks"] for row in rows} == {0, 1}
    assert all(row["query_text"] and row["position"] for row in rows)
    # query_id = text_id_of(query): spellings that normalise alike are one query, not a collision.
    assert trec["id_hash_collisions"] == {}
    esci = ingest.run(["--dataset", "esci_ubi", "--out", str(tmp_path / "esci")])
    assert esci["rows_in"] == 1999
    assert esci["rows_written"] + esci["rows_rejected"] == 1999
    assert esci["source_stats"]["click_events"] == 287
    assert esci["id_hash_collisions"] == {}
    assert sum(row["clicks"] for row in read_rows(tmp_path / "esci")) > 0


def test_rerun_gives_the_same_rows_and_seed_changes_splits(tmp_path: Path) -> None:
    spec = ["--dataset", "trec2013"]
    ingest.run([*spec, "--out", str(tmp_path / "a"), "--seed", "1"])
    # The rerun goes through a TestPipeline, as Beam's examples are tested.
    ingest.run([*spec, "--out", str(tmp_path / "b"), "--seed", "1"], test_pipeline=BeamTestPipeline())
    ingest.run([*spec, "--out", str(tmp_path / "c"), "--seed", "2"])
    a, b, c = (read_rows(tmp_path / name) for name in "abc")
    assert a == b
    assert [row["split"] for row in a] != [row["split"] for row in c]
    assert read_rejected(tmp_path / "a") == read_rejected(tmp_path / "b")


@pytest.mark.parametrize("mode", ["cold_group", "time"])
def test_split_modes(tmp_path: Path, mode: str) -> None:
    out = tmp_path / mode
    manifest = ingest.run(["--dataset", "trec2013", "--out", str(out), "--split-mode", mode])
    rows = read_rows(out)
    assert all(manifest["split"]["rows"][s] > 0 for s in SPLITS)
    if mode == "cold_group":
        groups: dict[str, set[str]] = {}
        for row in rows:
            groups.setdefault(row["query_id"], set()).add(row["split"])
        assert all(len(s) == 1 for s in groups.values())
    else:
        by_split = {s: [row["event_timestamp"] for row in rows if row["split"] == s] for s in SPLITS}
        assert max(by_split["train"]) <= min(by_split["valid"])
        assert max(by_split["valid"]) <= min(by_split["test"])


def test_jsonl_source_with_malformed_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps(
            {"q": "red shoes", "title": "Red running shoes", "ts": 1717527762025, "click": 1, "pos": 1}
        ),
        "{not json",
        json.dumps(
            {"q": "red shoes", "title": "Blue sandals", "ts": 1717527762999, "click": "maybe", "pos": 2}
        ),
        json.dumps({"q": "red shoes", "title": "Red boots", "ts": 1717527763999, "click": 0, "pos": 3}),
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    spec = {
        "name": "shop",
        "source": {"path": "log.jsonl", "format": "jsonl"},
        "columns": {"query_id": {"text_id_of": "q"}, "query_text": "q", "ad_id": {"hash_of": ["title"]},
                    "ad_text": "title"},
        "context": {"position": "pos"},
        "timestamp": {"column": "ts", "format": "epoch_ms"},
        "label": {"form": "binary", "clicked": "click"},
        "group": "query_id",
    }  # fmt: skip
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    manifest = ingest.run(
        ["--dataset", str(tmp_path / "spec.yaml"), "--out", str(tmp_path / "out"), "--max-reject-rate", "0.6"]
    )
    assert (manifest["rows_in"], manifest["rows_written"]) == (4, 2)
    assert manifest["rejected_by_reason"] == {records.MALFORMED_RECORD: 1, records.BAD_LABEL: 1}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nlpctr.pipelines.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    wrong = dict(SPEC, columns={**SPEC["columns"], "ad_text": "headline"})
    spec = make_log(tmp_path, wrong)
    result = run_cli("data", "prepare", "--dataset", str(spec), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("nlpctr: error")]
    assert (
        len(error_lines) == 1 and "'headline'" in error_lines[0] and "fix the column name" in error_lines[0]
    )

    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    spec_path = tmp_path / "p.yaml"
    spec_path.write_text(yaml.safe_dump({**SPEC, "source": {"path": "broken.parquet", "format": "parquet"}}))
    result = run_cli("data", "prepare", "--dataset", str(spec_path), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a readable parquet file" in result.stderr
    assert not (tmp_path / "o").exists()


def test_repeated_id_hashes_finds_exactly_the_ids_seen_twice_across_bundles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest_validate.RepeatedIdHashes, "COMPACT_EVERY", 7)  # compact many times
    combine = ingest_validate.RepeatedIdHashes()
    ids = [f"imp-{i}" for i in range(100)]
    # Three bundles: one repeat inside a bundle, two across bundles, one id thrice.
    bundles = [[*ids[:40], "imp-3"], [*ids[40:80], "imp-10", "imp-50"], [*ids[80:], "imp-99", "imp-3"]]
    accumulators = []
    for bundle in bundles:
        acc = combine.create_accumulator()
        for impression_id in bundle:
            acc = combine.add_input(acc, ingest_validate.id_hash(impression_id))
        accumulators.append(acc)
    repeated = combine.extract_output(combine.merge_accumulators(accumulators))
    assert repeated == {ingest_validate.id_hash(i) for i in ("imp-3", "imp-10", "imp-50", "imp-99")}
    id_hash = ingest_validate.id_hash
    assert id_hash("imp-3") == id_hash("imp-3") != id_hash("imp-4")


COLLIDING_CSV = """id,query,title,test,ts,n,k
1,cats,Headline A,t1,2024-01-01T00:00:00Z,10,2
2,cats,Headline A,t1,2024-01-02T00:00:00Z,5,1
3,dogs,Headline B,t2,2024-01-02T00:00:00Z,5,0
4,Cats ,Headline C,t3,2024-01-03T00:00:00Z,7,1
4,Cats ,Headline C,t3,2024-01-03T00:00:00Z,7,1
5,birds,Headline D,t4,2024-01-03T00:00:00Z,4,0
6,fish,Headline E,t5,2024-01-04T00:00:00Z,9,3
7,fish,Headline F,t6,2024-01-04T00:00:00Z,3,0
9,mice,Headline G,t7,2024-01-05T00:00:00Z,8,2
10,cats,Headline H,t8,2024-01-05T00:00:00Z,6,1
"""
COLLIDING_SPEC = {
    **SPEC,
    "columns": {
        "impression_id": "id",
        "query_id": {"text_id_of": "query"},
        "query_text": "query",
        "ad_id": {"hash_of": ["title", "test"]},
        "ad_text": "title",
    },
}


def test_two_sources_hashed_to_one_id_are_dead_letters_not_one_entity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Force 64-bit collisions: ad_id ("Headline B", "t2") gets the id of ("Headline A", "t1"),
    query_id "birds" the id of "fish". Every row of those two ids is an id_hash_collision dead
    letter with its source row; rows that share an id from one source ("Headline A" twice,
    "cats"/"Cats ") are no collision; the counts add up."""
    real_hash, real_text_id = records.stable_hash, records.text_id
    monkeypatch.setattr(
        records,
        "stable_hash",
        lambda *parts: real_hash("Headline A", "t1") if parts == ("Headline B", "t2") else real_hash(*parts),
    )
    monkeypatch.setattr(
        records,
        "text_id",
        lambda text: real_text_id("fish") if text.strip() == "birds" else real_text_id(text),
    )
    out = tmp_path / "out"
    spec = make_log(tmp_path, COLLIDING_SPEC, COLLIDING_CSV)
    manifest = ingest.run(["--dataset", str(spec), "--out", str(out), "--max-reject-rate", "1"])

    assert manifest["rows_in"] == 10
    assert manifest["rows_in"] == manifest["rows_written"] + manifest["rows_rejected"]
    assert manifest["rejected_by_reason"] == {
        records.ID_HASH_COLLISION: 6,
        records.DUPLICATE_IMPRESSION_ID: 1,
    }
    assert manifest["id_hash_collisions"] == {"ad_id": 1, "query_id": 1}
    assert [row["impression_id"] for row in read_rows(out)] == ["10", "4", "9"]

    header, *lines = COLLIDING_CSV.splitlines()
    source_rows = [dict(zip(header.split(","), line.split(","), strict=True)) for line in lines]
    rejected = read_rejected(out)
    assert len(rejected) == manifest["rows_rejected"]
    collided = [r for r in rejected if r["reason"] == records.ID_HASH_COLLISION]
    # The original source rows, untouched (not the mapped ones).
    assert sorted((r["record"] for r in collided), key=lambda row: int(row["id"])) == [
        row for row in source_rows if row["id"] in {"1", "2", "3", "5", "6", "7"}
    ]
    by_id = {r["record"]["id"]: r["message"] for r in collided}
    ad_id = real_hash("Headline A", "t1")
    assert all(f"ad_id {ad_id!r}" in by_id[i] and "title, test" in by_id[i] for i in ("1", "2", "3"))
    assert all("query_id" in by_id[i] and "of query" in by_id[i] for i in ("5", "6", "7"))


def test_collided_ids_needs_two_different_sources_of_one_id_across_bundles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ingest_validate.CollidedIds, "COMPACT_EVERY", 3)  # compact many times
    combine = ingest_validate.CollidedIds()
    digest, key = ingest_validate.source_digest, ingest_validate.id_key

    def collided(*bundles: list[tuple[str, str, str]]) -> frozenset:
        accumulators = []
        for bundle in bundles:
            acc = combine.create_accumulator()
            for column, id_value, preimage in bundle:
                acc = combine.add_input(acc, (column, key(id_value), digest(preimage)))
            accumulators.append(acc)
        return combine.extract_output(combine.merge_accumulators(accumulators))

    a, b = "00000000000000aa", "ffffffffffffffff"  # ids as stable_hash writes them (64 bits)
    same_source = [("ad_id", a, "x")] * 5
    assert collided(same_source, same_source, []) == frozenset()
    # Each bundle alone looks clean; one id under two columns is two ids.
    assert collided(
        [("ad_id", a, "x")], [("ad_id", a, "y"), ("query_id", b, "x")], [("query_id", b, "x")]
    ) == {("ad_id", key(a))}
    many = [("ad_id", f"{n:016x}", f"src{n}") for n in range(20)]
    assert collided(many, [*many[::-1], ("ad_id", b, "p"), ("query_id", a, "q"), ("ad_id", b, "r")]) == {
        ("ad_id", key(b))
    }
    assert key(b) == 2**64 - 1 and key("not hex") != key("not hex!")
    assert digest("a\x1fb") != digest("a\x1fc")


# ------------------------------------------------------------------- the composite transforms


def test_read_and_validate_give_rows_once_deduped_and_a_dead_letter_per_bad_record(tmp_path: Path) -> None:
    """ReadSourceRecords -> FindRepeatedIds -> ValidateImpressions on the bad log: ids that
    occur once stream through, the repeated id is shuffled and kept once, every bad record is
    a Rejection with its reason."""
    spec = load_spec(str(make_log(tmp_path)))
    limits = records.Limits(max_text_chars=spec.max_text_chars)
    with BeamTestPipeline() as pipeline:
        source = pipeline | ingest_source.ReadSourceRecords(spec)
        ids = source["records"] | ingest_validate.FindRepeatedIds(spec, limits)
        streams, rejected, _ = source["records"] | ingest_validate.ValidateImpressions(
            spec, limits, ids["repeated"], ids["collided"]
        )
        assert_that(
            streams[0] | "OnceIds" >> beam.Map(lambda r: r["impression_id"]),
            equal_to(["2", "14"]),
            label="Once",
        )
        assert_that(
            streams[1] | "DedupedIds" >> beam.Map(lambda r: r["impression_id"]),
            equal_to(["1"]),
            label="Deduped",
        )
        reasons = [reason for reason, n in EXPECTED_REASONS.items() for _ in range(n)]
        assert_that(rejected | beam.Map(lambda r: r.reason), equal_to(reasons), label="Reasons")


def test_time_split_cuts_at_the_fractions_of_the_timestamps() -> None:
    """Ten rows an hour apart, 60/20/20: the six earliest train, two valid, two test."""
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    rows = [{"impression_id": f"r{k}", "event_timestamp": t0 + dt.timedelta(hours=k)} for k in range(10)]
    fractions = (0.6, 0.2, 0.2)
    with BeamTestPipeline() as pipeline:
        created = pipeline | beam.Create(rows)
        cuts = created | beam.Map(lambda r: r["event_timestamp"]) | ingest_validate.TimeCutPoints(fractions)
        split = created | ingest_validate.AssignSplits("time", fractions, 0, "impression_id", cuts)
        expected = [(f"r{k}", "train" if k < 6 else "valid" if k < 8 else "test") for k in range(10)]
        assert_that(split | beam.Map(lambda r: (r["impression_id"], r["split"])), equal_to(expected))


def test_cold_group_split_keeps_each_group_in_one_split() -> None:
    rows = [{"impression_id": f"r{k}", "test_id": f"g{k % 7}" if k % 10 else None} for k in range(200)]

    def one_split_per_group(split_rows: list[dict]) -> None:
        assert len(split_rows) == len(rows)
        by_group: dict[str, set[str]] = {}
        for row in split_rows:
            if row["test_id"] is not None:
                by_group.setdefault(row["test_id"], set()).add(row["split"])
        assert len(by_group) == 7 and all(len(splits) == 1 for splits in by_group.values()), by_group
        assert len({row["split"] for row in split_rows}) > 1  # rows with no group spread out

    with BeamTestPipeline() as pipeline:
        split = (
            pipeline
            | beam.Create(rows)
            | ingest_validate.AssignSplits("cold_group", (0.4, 0.3, 0.3), 3, "test_id")
        )
        assert_that(split, one_split_per_group)
