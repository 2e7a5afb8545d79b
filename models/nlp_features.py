"""NLP features on the rows of a frame: what the redundancy measures and increments read.

Each LM feature is stored with one row per (query_text_id, ad_text_id) key, stamped at the key's
first impression (`models/lm_features.py`), so joining it on that key gives what Feast's
point-in-time join gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nlpctr.layout import pair_key_columns


@dataclass
class NlpFeature:
    """One NLP feature on every row of the base frame (rows in impression_id order).

    `measured` is what the redundancy probes look at (a score, or a vector); `cascade` and
    `score` are what joins E0 when the feature's increment is trained.
    """

    name: str
    kind: str  # frozen | cascade_finetuned | joint | student
    measured: np.ndarray
    cascade: np.ndarray | None = None
    score: np.ndarray | None = None

    @classmethod
    def of_output(cls, name: str, kind: str, output: np.ndarray) -> NlpFeature:
        """An LM's output per row: a score (1-d) joins E0 as a score, a vector as a cascade input."""
        if output.ndim == 1:
            return cls(name, kind, output, score=output)
        return cls(name, kind, output, cascade=output)


def pair_keys(frame: pd.DataFrame) -> pd.DataFrame:
    """The (query_text_id, ad_text_id) key LM features are stored under; no query -> ''."""
    query = frame["query_text_id"] if "query_text_id" in frame else pd.Series("", index=frame.index)
    return pd.DataFrame({"query_text_id": query.fillna("").astype(str), "ad_text_id": frame["ad_text_id"]})


def join_pair_table(frame: pd.DataFrame, table: pd.DataFrame, column: str) -> np.ndarray:
    """`table[column]` (keyed by text pair) for every row of `frame`, in order; a missing key is an error."""
    keys = pair_keys(frame)
    if "query_text_id" not in table:
        table = table.assign(query_text_id="")
    on = pair_key_columns()
    joined = keys.merge(table[[*on, column]], on=on, how="left", validate="many_to_one")
    if joined[column].isna().any():
        raise RuntimeError(f"{column}: {int(joined[column].isna().sum())} rows have no LM feature")
    values = joined[column].to_numpy()
    return np.stack(values).astype(np.float32) if values.dtype == object else values.astype(np.float32)


def frozen_vectors(frame: pd.DataFrame) -> np.ndarray:
    """E1's text input: the ad's and (when there is one) the query's frozen vectors, side by side."""
    columns = sorted(c for c in frame.columns if c.endswith("__embedding"))
    parts = []
    for column in columns:
        present = frame[column].dropna()
        dim = len(present.iloc[0])
        parts.append(
            np.stack(
                [np.zeros(dim, np.float32) if v is None else np.asarray(v, np.float32) for v in frame[column]]
            )
        )
    return np.concatenate(parts, axis=1)


def lm_feature(folder: Path, frame: pd.DataFrame, kind: str, name: str) -> NlpFeature:
    """The LM feature written in `folder` (one epoch of a run's LM features) on the frame's rows."""
    table = pd.read_parquet(folder)
    columns = [c for c in ("lm_score", "supplementary", "lm_embedding") if c in table]
    values = {c: join_pair_table(frame, table, c) for c in columns}
    if "lm_embedding" in values and "lm_score" in values:  # E2: the score is its output
        return NlpFeature(name, kind, values["lm_score"], values["lm_embedding"], values["lm_score"])
    if "lm_score" in values:
        return NlpFeature(name, kind, values["lm_score"], score=values["lm_score"])
    return NlpFeature(name, kind, values["supplementary"], cascade=values["supplementary"])
