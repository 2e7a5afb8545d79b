"""Builders the tests share: a small prepared dataset (`make_dataset`), and job outputs written
straight in their jobs' layouts (CTR history with pandas, random embeddings), so a test about the
store or the trainers need not run the Beam jobs first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from nlpctr.models.schema import impression_schema, text_id

SLUG = "minilm_test_mean_len32"
VERSION = "all-MiniLM-L6-v2@test==0/layers=6/pooling=mean/max_length=32"
DIM = 384
BASE = pd.Timestamp("2021-03-01", tz="UTC")


def make_dataset(root: Path, rows: int = 300, seed: int = 0, with_query: bool = True) -> Path:
    """A prepared dataset folder: manifest + impressions in the canonical schema.

    Sessions of 5 results share one timestamp; an ad can appear twice in a session at two
    positions, so rows share (ad_id, event_timestamp) and (ad_text_id, event_timestamp).
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ad_texts = [f"Ad headline number {i} about topic {i % 7}" for i in range(30)]
    ads = [(f"ad{i:03d}", ad_texts[i % len(ad_texts)]) for i in range(40)]
    queries = [f"query words {q}" for q in range(12)]
    records: list[dict[str, Any]] = []
    session = 0
    while len(records) < rows:
        ts = BASE + pd.Timedelta(days=int(session * 90 / (rows / 5)), minutes=session)
        query = queries[int(rng.integers(len(queries)))] if with_query else None
        picks = rng.integers(len(ads), size=5)
        if session % 4 == 0:
            picks[1] = picks[0]  # one ad shown twice in the session
        for position, pick in enumerate(picks, start=1):
            ad_id, ad_text = ads[int(pick)]
            records.append(
                {
                    "impression_id": f"s{session}:{position}",
                    "event_timestamp": ts.to_pydatetime(),
                    "query_id": text_id(query) if query else None,
                    "query_text": query,
                    "ad_id": ad_id,
                    "ad_text": ad_text,
                    "position": str(position),
                    "session_id": str(session),
                    "impressions": 1,
                    "clicks": int(rng.random() < 0.2 + 0.1 * (position == 1)),
                    "query_text_id": text_id(query) if query else None,
                    "ad_text_id": text_id(ad_text),
                    "split": str(rng.choice(["train", "valid", "test"], p=[0.8, 0.1, 0.1])),
                }
            )
        session += 1
    records = records[:rows]
    context = ["position", "session_id"]
    table = pa.Table.from_pylist(records, schema=impression_schema(context))
    (root / "impressions").mkdir(exist_ok=True)
    pq.write_table(table, root / "impressions" / "part-00000-of-00001.parquet")
    entities = ["ad_id", "query_id", "position"] if with_query else ["ad_id", "position"]
    manifest = {
        "dataset": "synthetic" if with_query else "synthetic_noquery",
        "context_columns": context,
        "entities": entities,
        "group": "query_id" if with_query else "ad_id",
        "rows_written": len(records),
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return root


def impressions(data_dir: Path) -> pd.DataFrame:
    return ds.dataset(data_dir / "impressions", format="parquet").to_table().to_pandas()


def write_ctr_history(data_dir: Path, prior_strength: float = 10.0) -> dict[str, Any]:
    """CTR history in the ctr-stats job's layout, with pandas (for tests that shape its rows)."""
    rows = impressions(data_dir)
    entities = json.loads((data_dir / "manifest.json").read_text())["entities"]
    train = rows.split == "train"
    p0 = rows[train].clicks.sum() / rows[train].impressions.sum()
    snapshot = rows.event_timestamp.min()
    per_row = rows[["impression_id", "event_timestamp"]].copy()
    for entity in entities:
        totals = rows[train].groupby(entity)[["impressions", "clicks"]].sum()
        level = pd.DataFrame(
            {
                entity: totals.index.astype(str),
                "event_timestamp": snapshot,
                f"{entity}_impressions": totals.impressions.to_numpy(),
                f"{entity}_clicks": totals.clicks.to_numpy(),
            }
        )
        level[f"{entity}_ctr"] = (level[f"{entity}_clicks"] + prior_strength * p0) / (
            level[f"{entity}_impressions"] + prior_strength
        )
        shutil.rmtree(data_dir / "ctr_history" / entity, ignore_errors=True)
        (data_dir / "ctr_history" / entity).mkdir(parents=True)
        level.to_parquet(data_dir / "ctr_history" / entity / "part-0.parquet", index=False)
        seen_i = rows[entity].map(totals.impressions).fillna(0) - rows.impressions.where(train, 0)
        seen_c = rows[entity].map(totals.clicks).fillna(0) - rows.clicks.where(train, 0)
        per_row[f"{entity}_ctr"] = (seen_c + prior_strength * p0) / (seen_i + prior_strength)
        per_row[f"{entity}_impressions"] = seen_i.astype("int64")
    shutil.rmtree(data_dir / "ctr_history_rows", ignore_errors=True)
    (data_dir / "ctr_history_rows").mkdir()
    per_row.to_parquet(data_dir / "ctr_history_rows" / "part-0.parquet", index=False)
    meta = {
        "entities": entities,
        "global_ctr": float(p0),
        "prior_strength": prior_strength,
        "snapshot_timestamp": snapshot.isoformat(),
    }
    (data_dir / "ctr_history" / "_meta.json").write_text(json.dumps(meta))
    return meta


def write_embeddings(
    data_dir: Path, slug: str = SLUG, version: str = VERSION, seed: int = 0, dim: int = DIM
) -> dict[str, np.ndarray]:
    """Random vectors for every unique text, in the embed job's layout; returns text_id -> vector."""
    rows = impressions(data_dir)
    texts = pd.concat(
        [
            rows[["ad_text_id", "event_timestamp"]].set_axis(["text_id", "event_timestamp"], axis=1),
            rows[["query_text_id", "event_timestamp"]].set_axis(["text_id", "event_timestamp"], axis=1),
        ]
    ).dropna()
    first = texts.groupby("text_id").event_timestamp.min().sort_index()
    vectors = np.random.default_rng(seed).standard_normal((len(first), dim)).astype(np.float32)
    table = pa.table(
        {
            "text_id": pa.array(first.index.to_list(), pa.string()),
            "embedding": pa.array(list(vectors), pa.list_(pa.float32())),
            "encoder_version": pa.array([version] * len(first), pa.string()),
            "event_timestamp": pa.array(first.to_list(), pa.timestamp("us", tz="UTC")),
        }
    )
    out = data_dir / "embeddings" / slug
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pq.write_table(table, out / "part-00000-of-00001.parquet")
    (out / "_manifest.json").write_text(json.dumps({"encoder_version": version, "slug": slug, "dim": dim}))
    return dict(zip(first.index, vectors, strict=True))


def run_ctr_stats(data_dir: Path, prior_strength: float = 10.0) -> None:
    """The real ctr-stats job (Beam, DirectRunner)."""
    from nlpctr.pipelines import ctr_stats

    ctr_stats.run(["--data", str(data_dir), "--prior-strength", str(prior_strength)])
