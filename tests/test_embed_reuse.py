"""Incremental embedding (pipelines/embed_reuse.py): a rerun after new impressions encodes only the
texts its published folder lacks, and writes what a full run of the final data writes."""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_embed_text import BASE, CONFIG, WORDS, impressions_rows, job_args, read_output, write_impressions

from nlpctr.layout import EMBEDDINGS_MANIFEST, embeddings_dir
from nlpctr.models.encoder import load_tokenizer, token_ids
from nlpctr.models.schema import impression_schema, text_id
from nlpctr.pipelines import embed_reuse, embed_text

NEW_TEXTS = 24
# Not bitwise: a reused vector was computed in another batch (other companions, another padded
# length) than the full run's, and padding changes the matmul shapes and so the order of the
# float32 sums. A full run is itself batch-composition dependent: two full runs of the same data
# are bitwise equal, but with --no-length-grouping or --batch-size 7 they differ from the default
# by up to 4.8e-7 (1-layer MiniLM, these 144 texts) or 9.5e-7 (2 layers, 1,500 Upworthy
# headlines), 3.3e-7 of the row's largest |component| in both, the same as an incremental run
# differs from a full one (4.8e-7 here; 7.2e-7 and 1.2e-6 for 1,500 and 6,000 headlines). 5e-6
# bounds that with margin; a wrong vector (another spelling, another encoder) differs by > 1e-2.
ATOL = 5e-6


def impression(n: int, when: dt.datetime, ad: str, query: str | None = None) -> dict[str, Any]:
    return {
        "impression_id": f"new{n}",
        "event_timestamp": when,
        "query_id": None if query is None else text_id(query),
        "query_text": query,
        "ad_id": text_id(ad),
        "ad_text": ad,
        "impressions": 1,
        "clicks": 0,
        "query_text_id": None if query is None else text_id(query),
        "ad_text_id": text_id(ad),
        "split": "train",
    }


def later_rows(old: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """New impressions: NEW_TEXTS new ads and repeats of old texts after the old rows, plus two
    old texts respelled at an earlier time (their first impression and spelling move). Returns
    the rows and {text id: why} of the old texts that must be encoded again."""
    rng = random.Random(11)
    late = BASE + dt.timedelta(days=30)
    rows = []
    for n in range(NEW_TEXTS):
        ad = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) + f" new{n}"
        rows.append(impression(n, late + dt.timedelta(minutes=n), ad, rng.choice([None, f"fresh query {n}"])))
    for n, row in enumerate(rng.sample(old, 20)):  # old texts again, later: nothing changes
        rows.append(impression(100 + n, late + dt.timedelta(hours=n), row["ad_text"], row["query_text"]))
    # Respelled before their first impression: the same text id, another spelling read by the
    # encoder. Fullwidth letters are one text after NFKC but other tokens for MiniLM.
    upper, wide = old[0]["ad_text"], old[1]["ad_text"]
    fullwidth = "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in wide)
    early = BASE - dt.timedelta(days=1)
    rows.append(impression(200, early, upper.upper()))
    rows.append(impression(201, early, fullwidth))
    return rows, {text_id(upper): "case", text_id(wide): "fullwidth"}


def append_impressions(data: Path, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows, schema=impression_schema([]))
    pq.write_table(table, data / "impressions" / "part-9.parquet")


def vectors(table: Any) -> np.ndarray:
    return np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Embed a folder, add impressions, embed it again (incremental) and embed a copy of the final
    data from scratch (full)."""
    root = tmp_path_factory.mktemp("reuse")
    old = impressions_rows()
    data = write_impressions(root / "incremental", old)
    first = embed_text.run(job_args(data))
    first_table = read_output(first["out"])  # replaced in place by the incremental run
    new, respelled = later_rows(old)
    append_impressions(data, new)
    copy = root / "full"
    shutil.copytree(data / "impressions", copy / "impressions")
    incremental = embed_text.run(job_args(data))
    full = embed_text.run(job_args(copy))
    return {
        "first": first,
        "first_table": first_table,
        "incremental": incremental,
        "full": full,
        "respelled": respelled,
        "data": data,
    }


def test_incremental_equals_a_full_run_of_the_final_data(runs: dict[str, Any]) -> None:
    inc, full = read_output(runs["incremental"]["out"]), read_output(runs["full"]["out"])
    assert inc.schema.equals(embed_text.EMBEDDING_SCHEMA)
    for column in ("text_id", "encoder_version", "event_timestamp"):
        assert inc.column(column).equals(full.column(column)), column
    np.testing.assert_allclose(vectors(inc), vectors(full), atol=ATOL, rtol=0)
    # The respelled texts' first impression moved earlier: the current data's time is written.
    stamps = dict(
        zip(inc.column("text_id").to_pylist(), inc.column("event_timestamp").to_pylist(), strict=True)
    )
    assert all(stamps[i] == BASE - dt.timedelta(days=1) for i in runs["respelled"])


def test_only_new_and_respelled_texts_are_encoded(runs: dict[str, Any]) -> None:
    first, inc, full = runs["first"], runs["incremental"], runs["full"]
    respelled = len(runs["respelled"])
    new = full["unique_texts"] - first["unique_texts"]
    assert new >= NEW_TEXTS  # new ads, and new queries with some of them
    assert inc["texts_encoded"] == new + respelled
    assert inc["texts_reused"] == first["unique_texts"] - respelled
    assert inc["unique_texts"] == inc["texts_reused"] + inc["texts_encoded"] == inc["rows_written"]
    assert inc["unique_texts"] == full["unique_texts"] == full["texts_encoded"] and full["texts_reused"] == 0
    assert f"({inc['texts_encoded']} encoded, {inc['texts_reused']} reused)" in inc["summary"]
    manifest = json.loads((Path(inc["out"]) / EMBEDDINGS_MANIFEST).read_text())
    assert (
        manifest["texts_encoded"] == inc["texts_encoded"] and manifest["texts_reused"] == inc["texts_reused"]
    )
    assert manifest["stored_texts_respelled"] == respelled and manifest["reused_from_previous_run"]
    assert manifest["rows"] == inc["rows_written"]


def test_a_respelled_text_is_not_reused_by_its_id_alone(runs: dict[str, Any]) -> None:
    """Fullwidth letters are the same text id (NFKC) but other tokens: the stored vector of the
    old spelling is wrong for the new first spelling, by far more than ATOL."""
    tokenizer = load_tokenizer(CONFIG.name)
    word = "dog"
    wide = "".join(chr(ord(c) + 0xFEE0) for c in word)
    assert text_id(wide) == text_id(word)
    assert token_ids(tokenizer, wide, 32) != token_ids(tokenizer, word, 32)
    (fullwidth,) = [i for i, why in runs["respelled"].items() if why == "fullwidth"]
    old, full = runs["first_table"], read_output(runs["full"]["out"])
    at_old = old.column("text_id").to_pylist().index(fullwidth)
    at_full = full.column("text_id").to_pylist().index(fullwidth)
    stale = vectors(old.slice(at_old, 1))[0] - vectors(full.slice(at_full, 1))[0]
    assert np.abs(stale).max() > 1e-2


def test_full_flag_and_nothing_new(runs: dict[str, Any], tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(runs["data"], data)
    again = embed_text.run(job_args(data))  # nothing new: every text reused, no forward pass
    assert again["texts_encoded"] == again["forward_passes"] == 0
    assert again["texts_reused"] == again["unique_texts"] == again["rows_written"]
    assert read_output(again["out"]).equals(read_output(runs["incremental"]["out"]))
    forced = embed_text.run(job_args(data, "--full"))
    assert forced["texts_reused"] == 0 and forced["texts_encoded"] == forced["unique_texts"]
    np.testing.assert_allclose(
        vectors(read_output(forced["out"])), vectors(read_output(runs["full"]["out"])), atol=ATOL, rtol=0
    )


def damage_manifest(folder: Path) -> None:
    manifest = json.loads((folder / EMBEDDINGS_MANIFEST).read_text())
    (folder / EMBEDDINGS_MANIFEST).write_text(json.dumps({**manifest, "rows": "garbled"}))


def truncate_parquet(folder: Path) -> None:
    part = sorted(folder.glob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])


def drop_spellings(folder: Path) -> None:
    for path in folder.glob("_spellings-*"):
        path.unlink()


def other_encoder_version(folder: Path) -> None:
    manifest = json.loads((folder / EMBEDDINGS_MANIFEST).read_text())
    (folder / EMBEDDINGS_MANIFEST).write_text(json.dumps({**manifest, "encoder_version": "other@1"}))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (damage_manifest, "dim/rows"),
        (truncate_parquet, "unreadable"),
        (drop_spellings, "_spellings"),
        (other_encoder_version, "other@1"),
    ],
)
def test_a_damaged_or_foreign_folder_is_a_full_run_with_one_warning(
    runs: dict[str, Any], tmp_path: Path, damage: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    shutil.copytree(runs["data"], data)
    damage(embeddings_dir(data, CONFIG.slug))
    with caplog.at_level(logging.WARNING, logger=embed_reuse.__name__):
        result = embed_text.run(job_args(data))
    warnings = [r.getMessage() for r in caplog.records if r.name == embed_reuse.__name__]
    assert len(warnings) == 1 and "not reusing" in warnings[0] and reason in warnings[0]
    assert "\n" not in warnings[0]
    assert result["texts_reused"] == 0 and result["texts_encoded"] == result["unique_texts"]
    np.testing.assert_allclose(
        vectors(read_output(result["out"])), vectors(read_output(runs["full"]["out"])), atol=ATOL, rtol=0
    )


def test_rows_of_another_encoder_version_are_encoded_again(runs: dict[str, Any], tmp_path: Path) -> None:
    """Row by row too: a stored row that names another encoder version is never reused."""
    data = tmp_path / "data"
    shutil.copytree(runs["data"], data)
    folder = embeddings_dir(data, CONFIG.slug)
    for part in folder.glob("part-*.parquet"):
        table = pq.read_table(part)
        versions = table.column("encoder_version").to_pylist()
        versions[0] = "other@1"
        index = table.schema.get_field_index("encoder_version")
        table = table.set_column(index, table.schema.field(index), pa.array(versions, pa.string()))
        pq.write_table(table, part)
    result = embed_text.run(job_args(data))
    parts = len(list(folder.glob("part-*.parquet")))
    assert result["texts_encoded"] == parts and result["texts_reused"] == result["unique_texts"] - parts
    np.testing.assert_allclose(
        vectors(read_output(result["out"])), vectors(read_output(runs["full"]["out"])), atol=ATOL, rtol=0
    )


def test_a_stored_file_that_fails_while_read_is_a_dead_letter(tmp_path: Path) -> None:
    """Past the footer check (e.g. a file gone or a page damaged meanwhile): its texts are encoded."""
    read = embed_reuse.ReadStoredVectors(CONFIG.version, 384)
    (out,) = list(read.process(str(tmp_path / "gone.parquet")))
    assert out.tag == "unreadable" and "gone.parquet" in out.value
    (out,) = list(embed_reuse.ReadSpellings().process(str(tmp_path / "gone.tsv.gz")))
    assert out.tag == "unreadable"


def test_two_worker_processes_and_texts_that_left_the_data(runs: dict[str, Any], tmp_path: Path) -> None:
    """The new impressions removed again, on two worker processes: the texts only they showed
    are dropped, the respelled ones are back to their first spelling (encoded again), and the
    output is the first run's."""
    data = tmp_path / "data"
    shutil.copytree(runs["data"], data)
    (data / "impressions" / "part-9.parquet").unlink()
    multi = ("--direct_running_mode=multi_processing", "--direct_num_workers=2")
    result = embed_text.run(job_args(data, *multi))
    first, respelled = runs["first_table"], len(runs["respelled"])
    assert result["texts_encoded"] == respelled and result["texts_reused"] == first.num_rows - respelled
    manifest = json.loads((Path(result["out"]) / EMBEDDINGS_MANIFEST).read_text())
    assert manifest["stored_texts_gone"] == runs["full"]["unique_texts"] - first.num_rows
    out = read_output(result["out"])
    for column in ("text_id", "encoder_version", "event_timestamp"):
        assert out.column(column).equals(first.column(column)), column
    np.testing.assert_allclose(vectors(out), vectors(first), atol=ATOL, rtol=0)
