"""The LM's outputs per text pair, written as the parquet a Feast view `lm_<run>` reads.

E2 writes one folder per epoch of its LM step, E3 one for its chosen state; each row is a
(query_text_id, ad_text_id) pair stamped at its first impression. Registering and materialising
the view is the feature store's (`pipelines/train.py` publishes what is written here).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from nlpctr.layout import lm_features_dir, pair_key_columns
from nlpctr.models.text_batches import Pair, TextBatcher


def text_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (query_text_id, ad_text_id) pair the LM reads: its texts and earliest time.

    A missing query text is keyed by the empty id, the one Feast's online store is sent for it.
    """
    query_id = frame["query_text_id"] if "query_text_id" in frame else pd.Series(None, index=frame.index)
    query = frame["query_text"] if "query_text" in frame else pd.Series(None, index=frame.index)
    pairs = pd.DataFrame(
        {
            "query_text_id": query_id.fillna("").astype(str),
            "ad_text_id": frame["ad_text_id"].astype(str),
            "query_text": query.where(query.notna(), None),
            "ad_text": frame["ad_text"],
            "event_timestamp": frame["event_timestamp"],
        }
    )
    pairs = pairs.sort_values(["query_text_id", "ad_text_id", "event_timestamp"], kind="stable")
    return pairs.groupby(["query_text_id", "ad_text_id"], sort=True, as_index=False).first()


def pairs_of(frame: pd.DataFrame) -> list[Pair]:
    """The (query text or None, ad text) of each row of `text_pairs`."""
    return list(zip(frame["query_text"], frame["ad_text"], strict=True))


def lm_outputs(
    texts: TextBatcher, heads: Mapping[str, nn.Module], pairs: list[Pair]
) -> dict[str, np.ndarray]:
    """The LM's vector of each pair (`lm_embedding`) and each head applied to it."""
    texts.lm.eval()
    vectors = texts.encode_pairs(pairs)
    out: dict[str, np.ndarray] = {"lm_embedding": vectors.cpu().numpy()}
    with torch.inference_mode():
        for name, head in heads.items():
            head.eval()
            out[name] = head(vectors).squeeze(-1).cpu().numpy().astype(np.float32)
    return out


def has_query_text(frame: pd.DataFrame) -> bool:
    return "query_text_id" in frame and bool(frame["query_text_id"].notna().any())


def write_lm_features(
    folder: Path, pairs: pd.DataFrame, outputs: dict[str, np.ndarray], model_version: str, with_query: bool
) -> None:
    """One parquet of the LM's outputs per text pair, keyed as the Feast view reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    columns: dict[str, pa.Array] = {}
    for key in pair_key_columns(with_query):  # the same columns the run's _meta.json names as keys
        columns[key] = pa.array(pairs[key], pa.string())
    columns["event_timestamp"] = pa.array(
        pd.to_datetime(pairs["event_timestamp"], utc=True), pa.timestamp("us", tz="UTC")
    )
    for name, values in outputs.items():
        if values.ndim == 1:
            columns[name] = pa.array(values.astype(np.float32), pa.float32())
        else:
            flat = pa.array(values.astype(np.float32, copy=False).reshape(-1))  # no per-row Python objects
            rows = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
            columns[name] = rows.cast(pa.list_(pa.float32()))
    columns["model_version"] = pa.array([model_version] * len(pairs), pa.string())
    pq.write_table(pa.table(columns), folder / "part-0.parquet")


def lm_feature_root(data_dir: Path, slug: str) -> Path:
    """A run's LM-feature folder, emptied: a re-run replaces the run's features whole."""
    folder = lm_features_dir(data_dir, slug)
    shutil.rmtree(folder, ignore_errors=True)
    return folder
