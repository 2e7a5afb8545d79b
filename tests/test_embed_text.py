"""The Beam embedding job: one forward per unique text, exact output layout, atomic publish."""

from __future__ import annotations

import datetime as dt
import json
import math
import random
from pathlib import Path
from typing import Any

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from nlpctr.errors import UserError
from nlpctr.layout import EMBEDDINGS_MANIFEST, embeddings_dir
from nlpctr.models.encoder import EMBEDDING_DIM, EncoderConfig, TextEncoder
from nlpctr.models.schema import impression_schema, normalize_text, text_id
from nlpctr.pipelines import embed_text, encode_texts, unique_texts
from nlpctr.pipelines.unique_texts import TextIdCollision, UniqueText

CONFIG = EncoderConfig(layers=1)
BATCH = 16
BASE = dt.datetime(2024, 3, 1, tzinfo=dt.UTC)
# fmt: off
WORDS = [
    "the", "a", "dog", "cat", "surf", "wave", "city", "tiny", "giant", "secret", "trick", "why",
    "how", "you", "will", "never", "believe", "what", "happened", "next", "mother", "father",
    "school", "money", "health", "food", "water", "climate", "science", "video", "photo", "story",
]
# fmt: on


def impressions_rows(seed: int = 0) -> list[dict[str, Any]]:
    """~300 impressions over ~100 ads and 12 queries, with respelled duplicates and null queries."""
    rng = random.Random(seed)
    ads = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 45))) for _ in range(100)]
    queries = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(12)]
    rows = []
    for i in range(300):
        ad = rng.choice(ads)
        if rng.random() < 0.2:  # same text id, other spelling: must not be encoded twice
            ad = "  " + ad.upper().replace(" ", "   ") + " "
        query = rng.choice(queries) if rng.random() < 0.5 else None
        rows.append(
            {
                "impression_id": f"i{i}",
                "event_timestamp": BASE + dt.timedelta(minutes=rng.randint(0, 10_000)),
                "query_id": None if query is None else text_id(query),
                "query_text": query,
                "ad_id": text_id(ad),
                "ad_text": ad,
                "impressions": 1,
                "clicks": int(rng.random() < 0.1),
                "query_text_id": None if query is None else text_id(query),
                "ad_text_id": text_id(ad),
                "split": "train",
            }
        )
    return rows


def write_impressions(folder: Path, rows: list[dict[str, Any]], files: int = 2) -> Path:
    """A prepared-dataset folder: impressions/*.parquet in the canonical schema."""
    (folder / "impressions").mkdir(parents=True)
    schema = impression_schema([])
    step = max(1, math.ceil(len(rows) / files))
    for n, start in enumerate(range(0, max(len(rows), 1), step)):
        table = pa.Table.from_pylist(rows[start : start + step], schema=schema)
        pq.write_table(table, folder / "impressions" / f"part-{n}.parquet")
    return folder


def expected_texts(rows: list[dict[str, Any]]) -> dict[str, tuple[dt.datetime, str]]:
    """text id -> (earliest timestamp, spelling at that timestamp), computed without the job."""
    best: dict[str, tuple[dt.datetime, str]] = {}
    for row in rows:
        for id_col, text_col in (("query_text_id", "query_text"), ("ad_text_id", "ad_text")):
            if row[text_col] is None:
                continue
            key = row[id_col]
            candidate = (row["event_timestamp"], row[text_col])
            if key not in best or candidate < best[key]:
                best[key] = candidate
    return best


def read_output(folder: str | Path) -> pa.Table:
    return pads.dataset(str(folder), format="parquet").to_table().sort_by("text_id")


def job_args(data: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--layers", str(CONFIG.layers), "--batch-size", str(BATCH), *extra]


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return impressions_rows()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, Any]]) -> Path:
    return write_impressions(tmp_path_factory.mktemp("data"), rows)


@pytest.fixture(scope="module")
def first_run(dataset: Path) -> dict[str, Any]:
    return embed_text.run(job_args(dataset))


def test_one_row_per_unique_text(first_run: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    expected = expected_texts(rows)
    assert 50 < len(expected) <= 200
    table = read_output(first_run["out"])
    assert table.schema.equals(embed_text.EMBEDDING_SCHEMA)
    ids = table.column("text_id").to_pylist()
    assert ids == sorted(expected)  # every unique text, each exactly once
    assert {len(v) for v in table.column("embedding").to_pylist()} == {EMBEDDING_DIM}
    assert set(table.column("encoder_version").to_pylist()) == {CONFIG.version}
    first_seen = table.column("event_timestamp").to_pylist()
    assert first_seen == [expected[i][0] for i in ids]


def test_exactly_one_forward_per_unique_text(first_run: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    unique = len(expected_texts(rows))
    assert first_run["unique_texts"] == first_run["texts_encoded"] == first_run["rows_written"] == unique
    assert math.ceil(unique / BATCH) <= first_run["forward_passes"] < unique
    assert 0 <= first_run["padding_ratio"] < 1
    assert first_run["out"] == str(embeddings_dir(first_run_data(first_run), CONFIG.slug))
    assert "embedded" in first_run["summary"] and "\n" not in first_run["summary"]


def first_run_data(summary: dict[str, Any]) -> Path:
    return Path(summary["out"]).parent.parent


def test_embeddings_equal_direct_encode(first_run: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    expected = expected_texts(rows)
    table = read_output(first_run["out"])
    ids = table.column("text_id").to_pylist()
    direct = TextEncoder(CONFIG).encode([expected[i][1] for i in ids], batch_size=BATCH)
    written = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(written, direct, atol=1e-5, rtol=0)


def test_manifest_and_no_leftovers(first_run: dict[str, Any]) -> None:
    out = Path(first_run["out"])
    manifest = json.loads((out / EMBEDDINGS_MANIFEST).read_text())
    assert manifest["encoder_version"] == CONFIG.version
    assert manifest["rows"] == first_run["rows_written"]
    assert sorted(p.name for p in out.parent.iterdir()) == [CONFIG.slug]  # no staging folders
    assert not (out / embed_text.STATS_FILE).exists()


def test_rerun_gives_identical_content(first_run: dict[str, Any], dataset: Path) -> None:
    before = read_output(first_run["out"])
    manifest = (Path(first_run["out"]) / EMBEDDINGS_MANIFEST).read_text()
    # As Beam's examples; --full encodes every text again (a plain rerun reuses them: test_embed_reuse).
    again = embed_text.run(job_args(dataset, "--full"), test_pipeline=BeamTestPipeline())
    assert again["out"] == first_run["out"]
    assert read_output(again["out"]).equals(before)
    assert (Path(again["out"]) / EMBEDDINGS_MANIFEST).read_text() == manifest
    assert sorted(p.name for p in Path(again["out"]).parent.iterdir()) == [CONFIG.slug]


def test_length_grouping_cuts_padding_same_vectors(
    first_run: dict[str, Any], tmp_path: Path, rows: list
) -> None:
    data = write_impressions(tmp_path / "data", rows)
    arrival = embed_text.run(job_args(data, "--no-length-grouping"))
    assert arrival["padding_ratio"] > first_run["padding_ratio"]
    assert arrival["texts_encoded"] == first_run["texts_encoded"]
    a, b = read_output(arrival["out"]), read_output(first_run["out"])
    assert a.column("text_id").equals(b.column("text_id"))
    np.testing.assert_allclose(
        np.asarray(a.column("embedding").to_pylist()),
        np.asarray(b.column("embedding").to_pylist()),
        atol=1e-5,
    )


def test_other_encoder_goes_to_its_own_folder(first_run: dict[str, Any], dataset: Path) -> None:
    cls = embed_text.run(job_args(dataset, "--pooling", "cls", "--max-length", "16"))
    other = EncoderConfig(layers=CONFIG.layers, pooling="cls", max_length=16)
    assert cls["out"] == str(embeddings_dir(dataset, other.slug)) != first_run["out"]
    assert set(read_output(cls["out"]).column("encoder_version").to_pylist()) == {other.version}
    assert set(read_output(first_run["out"]).column("encoder_version").to_pylist()) == {CONFIG.version}


def test_failed_run_leaves_previous_output_and_no_partial_folder(
    tmp_path: Path, rows: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_impressions(tmp_path / "data", rows[:40])
    good = embed_text.run(job_args(data))
    before = read_output(good["out"])

    def broken(results: list, encoder_version: str) -> pa.Table:
        raise RuntimeError("disk full")

    monkeypatch.setattr(embed_text, "rows_to_table", broken)
    with pytest.raises(Exception, match="disk full"):
        embed_text.run(job_args(data))
    assert read_output(good["out"]).equals(before)
    assert sorted(p.name for p in (data / "embeddings").iterdir()) == [CONFIG.slug]
    with pytest.raises(Exception, match="disk full"):
        embed_text.run(job_args(data, "--pooling", "cls"))
    assert sorted(p.name for p in (data / "embeddings").iterdir()) == [CONFIG.slug]


def test_missing_impressions_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nlpctr data prepare"):
        embed_text.run(["--data", str(tmp_path / "nowhere")])
    (tmp_path / "empty" / "impressions").mkdir(parents=True)
    with pytest.raises(UserError, match="nlpctr data prepare"):
        embed_text.run(["--data", str(tmp_path / "empty")])
    assert not (tmp_path / "nowhere").exists()
    write_impressions(tmp_path / "no_rows", [], files=1)
    with pytest.raises(UserError, match="no query or ad texts"):
        embed_text.run(["--data", str(tmp_path / "no_rows"), "--layers", "1"])
    assert sorted(p.name for p in (tmp_path / "no_rows" / "embeddings").iterdir()) == []


def test_wrong_schema_and_bad_flags_are_user_errors(tmp_path: Path, dataset: Path) -> None:
    (tmp_path / "impressions").mkdir()
    pq.write_table(pa.table({"ad_text": ["x"]}), tmp_path / "impressions" / "part-0.parquet")
    with pytest.raises(UserError, match="ad_text_id"):
        embed_text.run(["--data", str(tmp_path)])
    for flags in (["--layers", "7"], ["--layers", "0"], ["--batch-size", "0"], ["--max-length", "1000"]):
        with pytest.raises(UserError):
            embed_text.run(["--data", str(dataset), *flags])


def test_dedup_within_a_chunk_takes_the_earliest_spelling() -> None:
    t0 = BASE
    table = pa.table(
        {
            "query_text_id": [None, text_id("q one"), text_id("q one")],
            "query_text": [None, "Q  One", "q one"],
            "ad_text_id": [text_id("ad"), text_id("ad"), text_id("q one")],
            "ad_text": ["AD", "ad", "q one"],
            "event_timestamp": pa.array(
                [t0 + dt.timedelta(hours=2), t0 + dt.timedelta(hours=1), t0], pa.timestamp("us", tz="UTC")
            ),
        }
    )
    got = dict(unique_texts.texts_of_table(table))
    us = int(t0.timestamp() * 1_000_000)
    assert got == {
        text_id("ad"): unique_texts.UniqueText(us + 3_600_000_000, "ad"),
        # the ad column shows "q one" first (t0), before the query column's spellings
        text_id("q one"): unique_texts.UniqueText(us, "q one"),
    }


def test_multi_processing_matches_in_process(first_run: dict[str, Any], tmp_path: Path, rows: list) -> None:
    data = write_impressions(tmp_path / "data", rows)
    multi = embed_text.run(job_args(data, "--direct_running_mode=multi_processing", "--direct_num_workers=2"))
    assert (
        multi["unique_texts"] == multi["texts_encoded"] == multi["rows_written"] == first_run["rows_written"]
    )
    a, b = read_output(multi["out"]), read_output(first_run["out"])
    for column in ("text_id", "encoder_version", "event_timestamp"):
        assert a.column(column).equals(b.column(column)), column
    np.testing.assert_allclose(
        np.asarray(a.column("embedding").to_pylist()),
        np.asarray(b.column("embedding").to_pylist()),
        atol=1e-5,
    )


# ------------------------------------------------------------------- the composite transforms


def _chunk(rows: list[tuple[str, str, dt.datetime]]) -> pa.Table:
    """A chunk of impressions holding only ad texts: (ad_text_id, ad_text, event_timestamp)."""
    ids, texts, stamps = zip(*rows, strict=True)
    return pa.table(
        {
            "query_text_id": pa.array([None] * len(rows), pa.string()),
            "query_text": pa.array([None] * len(rows), pa.string()),
            "ad_text_id": list(ids),
            "ad_text": list(texts),
            "event_timestamp": pa.array(stamps, pa.timestamp("us", tz="UTC")),
        }
    )


def test_unique_texts_reports_an_id_two_different_texts_share() -> None:
    """Respellings of one text are one text; two texts under one (forged) id are a collision,
    across chunks or within one, and neither is passed on to be embedded."""
    us = int(BASE.timestamp() * 1_000_000)
    hour = dt.timedelta(hours=1)
    clean, across, within = text_id("tiny dog"), text_id("giant wave"), text_id("secret trick")
    chunks = [
        _chunk([(clean, "Tiny  Dog", BASE + hour), (across, "giant wave", BASE + 2 * hour)]),
        _chunk(
            [
                (clean, "tiny dog", BASE + 3 * hour),
                (across, "never believe", BASE + 4 * hour),  # another text, the same id
                (within, "secret trick", BASE),
                (within, "what happened next", BASE + hour),
            ]
        ),
    ]
    with BeamTestPipeline() as pipeline:
        found = pipeline | beam.Create(chunks) | unique_texts.UniqueTexts()
        assert_that(
            found["texts"], equal_to([(clean, UniqueText(us + 3_600_000_000, "Tiny  Dog"))]), label="Texts"
        )
        assert_that(
            found["collisions"],
            equal_to(
                [
                    TextIdCollision(across, ("giant wave", "never believe")),
                    TextIdCollision(within, ("secret trick", "what happened next")),
                ]
            ),
            label="Collisions",
        )


def test_earliest_spelling_merges_in_any_order() -> None:
    combine = unique_texts.EarliestSpelling()
    sightings = [UniqueText(5, "A b"), UniqueText(3, "a  B"), UniqueText(3, "a b"), UniqueText(9, "other")]
    for order in (sightings, sightings[::-1], sightings[2:] + sightings[:2]):
        halves = [order[:2], order[2:]]
        accumulators = []
        for half in halves:
            acc = combine.create_accumulator()
            for sighting in half:
                acc = combine.add_input(acc, sighting)
            accumulators.append(acc)
        assert combine.extract_output(combine.merge_accumulators(accumulators)) == (
            UniqueText(3, "a  B"),
            "other",
        )
    clean = combine.create_accumulator()
    for sighting in sightings[:3]:
        clean = combine.add_input(clean, sighting)
    assert combine.extract_output(clean) == (UniqueText(3, "a  B"), None)


def test_encode_texts_runs_one_forward_per_text_in_bounded_batches() -> None:
    """A 1-layer encoder through RunInference: each text once, its vector the direct encode's."""
    texts = [
        "the dog",
        "a giant wave in the city",
        "why",
        "you will never believe what happened next",
        "photo",
    ]
    elements = [(text_id(t), UniqueText(n, t)) for n, t in enumerate(texts)]
    direct = dict(zip(texts, TextEncoder(CONFIG).encode(texts, batch_size=8), strict=True))
    handler = encode_texts.TextEncoderModelHandler(CONFIG)

    def same_vectors(encoded: list[tuple[str, int, np.ndarray, int]]) -> None:
        assert sorted(e[0] for e in encoded) == sorted(text_id(t) for t in texts)  # each text once
        by_id = {text_id(t): t for t in texts}
        for tid, first_seen, vector, batch_size in encoded:
            assert first_seen == texts.index(by_id[tid])
            assert 1 <= batch_size <= 2
            np.testing.assert_allclose(vector, direct[by_id[tid]], atol=1e-5, rtol=0)

    with BeamTestPipeline() as pipeline:
        encoded = (
            pipeline
            | beam.Create(elements)
            | encode_texts.EncodeTexts(handler, batch_size=2)
            | beam.Map(
                lambda r: (
                    r.example.text_id,
                    r.example.first_seen_us,
                    r.inference.vector,
                    r.inference.batch_size,
                )
            )
        )
        assert_that(encoded, same_vectors)


def test_a_text_id_collision_is_a_dead_letter_not_a_shared_embedding(tmp_path: Path) -> None:
    """Two ad texts forced onto one id (as a 64-bit collision would): the job names both in
    `_collisions.jsonl`, embeds every other text, and gives that id no vector."""
    rows = impressions_rows(seed=4)[:60]
    victim, intruder = rows[0]["ad_text"], "a text that is no respelling of any other"
    assert text_id(intruder) != rows[0]["ad_text_id"]
    rows.append({**rows[0], "impression_id": "forged", "ad_text": intruder})  # keeps rows[0]'s id
    data = write_impressions(tmp_path / "data", rows)
    result = embed_text.run(job_args(data))
    shared = rows[0]["ad_text_id"]
    assert result["text_id_collisions"] == 1 and "1 text id(s) shared" in result["summary"]
    dead = [json.loads(line) for line in (Path(result["out"]) / embed_text.COLLISIONS_FILE).open()]
    assert len(dead) == 1 and dead[0]["reason"] == unique_texts.TEXT_ID_COLLISION
    assert dead[0]["text_id"] == shared
    assert sorted(normalize_text(t) for t in dead[0]["texts"]) == sorted([normalize_text(victim), intruder])
    written = read_output(result["out"]).column("text_id").to_pylist()
    assert shared not in written
    assert sorted(written) == sorted(set(expected_texts(rows[:-1])) - {shared})
    manifest = json.loads((Path(result["out"]) / EMBEDDINGS_MANIFEST).read_text())
    assert manifest["text_id_collisions"] == 1
