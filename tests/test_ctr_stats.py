"""CTR history: counts from training rows only, smoothed, leave-one-out on training rows."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import apache_beam as beam
import pandas as pd
import pyarrow.dataset as ds
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from nlpctr.errors import UserError
from nlpctr.pipelines import ctr_stats, ingest


@pytest.fixture(scope="module")
def trec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ctr") / "trec"
    ingest.run(["--dataset", "trec2013", "--out", str(out)])
    ctr_stats.run(["--data", str(out), "--prior-strength", "5"])
    return out


def frame(path: Path) -> pd.DataFrame:
    return ds.dataset(path, format="parquet").to_table().to_pandas()


def test_entity_level_stats_match_a_pandas_groupby_over_train_rows(trec: Path) -> None:
    rows = frame(trec / "impressions")
    train = rows[rows.split == "train"]
    p0 = train.clicks.sum() / train.impressions.sum()
    meta = json.loads((trec / "ctr_history" / "_meta.json").read_text())
    assert meta["global_ctr"] == pytest.approx(p0)
    for entity in ("ad_id", "query_id", "position"):
        expected = train.groupby(entity)[["impressions", "clicks"]].sum()
        got = frame(trec / "ctr_history" / entity).set_index(entity).sort_index()
        assert len(got) == len(expected)
        assert (got[f"{entity}_impressions"] == expected.impressions.loc[got.index]).all()
        assert (got[f"{entity}_clicks"] == expected.clicks.loc[got.index]).all()
        smoothed = (expected.clicks + 5 * p0) / (expected.impressions + 5)
        assert got[f"{entity}_ctr"].to_numpy() == pytest.approx(smoothed.loc[got.index].to_numpy())
        assert (got.event_timestamp == rows.event_timestamp.min()).all()


def test_training_rows_never_see_their_own_label(trec: Path) -> None:
    rows = frame(trec / "impressions").set_index("impression_id")
    history = frame(trec / "ctr_history_rows").set_index("impression_id").loc[rows.index]
    assert len(history) == len(rows)
    train = rows.split == "train"
    p0 = rows[train].clicks.sum() / rows[train].impressions.sum()
    totals = rows[train].groupby("position")[["impressions", "clicks"]].sum()
    per_row = totals.reindex(rows.position).fillna(0).set_axis(rows.index)
    own = rows[["impressions", "clicks"]].where(train, 0)
    loo_i = per_row.impressions - own.impressions
    loo_c = per_row.clicks - own.clicks
    assert (history.position_impressions == loo_i).all()
    assert history.position_ctr.to_numpy() == pytest.approx(((loo_c + 5 * p0) / (loo_i + 5)).to_numpy())
    # Flip one training row's label: its own feature must not move.
    clicked = rows[train & (rows.clicks == 1)].index[0]
    key = rows.loc[clicked, "position"]
    others = rows[train & (rows.position == key)].drop(index=clicked)
    assert history.loc[clicked, "position_ctr"] == pytest.approx(
        (others.clicks.sum() + 5 * p0) / (others.impressions.sum() + 5)
    )


def test_valid_and_test_rows_get_the_entity_level_values(trec: Path) -> None:
    rows = frame(trec / "impressions").set_index("impression_id")
    history = frame(trec / "ctr_history_rows").set_index("impression_id")
    entity = frame(trec / "ctr_history" / "ad_id").set_index("ad_id")
    held_out = rows[(rows.split != "train") & rows.ad_id.isin(entity.index)]
    assert len(held_out) > 50
    expected = entity.loc[held_out.ad_id, "ad_id_ctr"].to_numpy()
    assert history.loc[held_out.index, "ad_id_ctr"].to_numpy() == pytest.approx(expected)


def test_rerun_is_identical_and_missing_manifest_is_a_user_error(trec: Path, tmp_path: Path) -> None:
    before = frame(trec / "ctr_history_rows").sort_values("impression_id").reset_index(drop=True)
    # The rerun goes through a TestPipeline, as Beam's examples are tested.
    ctr_stats.run(["--data", str(trec), "--prior-strength", "5"], test_pipeline=BeamTestPipeline())
    after = frame(trec / "ctr_history_rows").sort_values("impression_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(before, after)
    with pytest.raises(UserError, match="nlpctr data prepare"):
        ctr_stats.run(["--data", str(tmp_path)])


def test_null_entity_keys_get_the_prior_and_no_count(tmp_path: Path) -> None:
    image = ["" if i % 4 == 0 else f"m{i % 2}" for i in range(40)]  # every 4th row has no image
    csv = "id,ad,title,ts,n,k,img\n" + "".join(
        f"{i},a{i % 3},Headline {i},2024-01-0{1 + i % 5}T00:00:00Z,{10 + i},{i % 4},{image[i]}\n"
        for i in range(40)
    )
    (tmp_path / "log.csv").write_text(csv)
    spec = {
        "name": "nulls",
        "source": {"path": "log.csv", "format": "csv"},
        "columns": {"impression_id": "id", "ad_id": "ad", "ad_text": "title"},
        "context": {"image_id": "img"},
        "timestamp": {"column": "ts", "format": "iso8601"},
        "label": {"form": "aggregated", "impressions": "n", "clicks": "k"},
        "group": "ad_id",
        "entities": ["ad_id", "image_id"],
    }
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    out = tmp_path / "out"
    ingest.run(["--dataset", str(tmp_path / "spec.yaml"), "--out", str(out)])
    ctr_stats.run(["--data", str(out)])
    rows = frame(out / "impressions").set_index("impression_id")
    history = frame(out / "ctr_history_rows").set_index("impression_id").loc[rows.index]
    meta = json.loads((out / "ctr_history" / "_meta.json").read_text())
    null_rows = rows.image_id.isna()
    assert null_rows.sum() == 10
    assert (history.image_id_impressions >= 0).all()
    assert (history.loc[null_rows, "image_id_impressions"] == 0).all()
    assert history.loc[null_rows, "image_id_ctr"].to_numpy() == pytest.approx(meta["global_ctr"])


def test_compute_ctr_history_smooths_toward_the_train_prior_leaving_one_out() -> None:
    """Hand-computed: train rows give the prior 2/5 and the totals a=(2, 1), b=(2, 0); m = 10."""
    t0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)

    def row(iid: str, ad: str | None, split: str, impressions: int, clicks: int, day: int) -> dict:
        return {"impression_id": iid, "ad_id": ad, "split": split, "impressions": impressions,
                "clicks": clicks, "event_timestamp": t0 + dt.timedelta(days=day)}  # fmt: skip

    rows = [
        row("a-train-click", "a", "train", 1, 1, 3),
        row("a-train", "a", "train", 1, 0, 1),
        row("a-test", "a", "test", 1, 1, 5),
        row("b-train", "b", "train", 2, 0, 2),
        row("no-ad", None, "train", 1, 1, 4),
        row("c-valid", "c", "valid", 3, 3, 6),  # an ad never seen in training
    ]
    prior, snapshot = 0.4, t0 + dt.timedelta(days=1)  # the earliest impression, of any split
    with BeamTestPipeline() as pipeline:
        history_rows = pipeline | beam.Create(rows)
        history = {"for_totals": history_rows, "rows": history_rows} | ctr_stats.ComputeCtrHistory(
            ("ad_id",), prior_strength=10
        )
        assert_that(
            history["prior"], equal_to([{"impressions": 5, "clicks": 2, "ctr": prior}]), label="Prior"
        )
        assert_that(history["snapshot"], equal_to([snapshot]), label="Snapshot")
        entity = {"event_timestamp": snapshot}
        assert_that(
            history["entity:ad_id"],
            equal_to(
                [
                    {**entity, "ad_id": "a", "ad_id_impressions": 2, "ad_id_clicks": 1, "ad_id_ctr": 5 / 12},
                    {**entity, "ad_id": "b", "ad_id_impressions": 2, "ad_id_clicks": 0, "ad_id_ctr": 4 / 12},
                ]
            ),
            label="EntityRows",
        )
        at = {r["impression_id"]: r["event_timestamp"] for r in rows}

        def history_of(iid: str, impressions: int, ctr: float) -> dict:
            return {"impression_id": iid, "event_timestamp": at[iid], "ad_id_impressions": impressions,
                    "ad_id_ctr": ctr}  # fmt: skip

        assert_that(
            history["rows"],
            equal_to(
                [
                    history_of("a-train-click", 1, (0 + 4) / 11),  # a without its own click
                    history_of("a-train", 1, (1 + 4) / 11),  # a without its own impression
                    history_of("a-test", 2, 5 / 12),  # held-out rows see the whole entity
                    history_of("b-train", 0, prior),  # b was only this row: nothing left
                    history_of("no-ad", 0, prior),
                    history_of("c-valid", 0, prior),
                ]
            ),
            label="RowHistory",
        )
