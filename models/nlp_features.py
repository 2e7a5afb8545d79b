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

SCORE, VECTOR = "score", "vector"
FORMS = (SCORE, VECTOR)


@dataclass
class NlpFeature:
    """One LM's feature on every row of the base frame (rows in impression_id order), in the two
    forms every LM is judged in: its pooled vector (what the LM encodes) and its 1-d click score.

    The score is the LM's own click head where it was trained with one (E2's head, the joint score
    fusion, a SuKD student of it); else it is None until a probe head fitted on the vectors gives
    one (`models.increments.FeatureJudge.judge`), `score_source` says which.
    """

    name: str
    kind: str  # frozen | cascade_finetuned | joint | probe | student
    vector: np.ndarray  # (rows, d)
    score: np.ndarray | None = None  # (rows,)
    score_source: str | None = None  # "head" (its own) or "probe"

    def __post_init__(self) -> None:
        if self.score is not None and self.score_source is None:
            self.score_source = "head"

    def form(self, form: str) -> np.ndarray:
        """The feature in `form` (score or vector)."""
        if form == VECTOR:
            return self.vector
        if self.score is None:
            raise ValueError(f"{self.name} has no score yet: fit a probe on its vectors")
        return self.score

    def key(self, form: str) -> str:
        """The name its measures and increments go by: `<name>/<form>`."""
        return feature_key(self.name, form)


def feature_key(name: str, form: str) -> str:
    """`<feature>/<form>`: one feature in one form (results.json's `redundancy` keys)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return f"{name}/{form}"


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
    """The LM feature written in `folder` (one checkpoint of a run's LM features) on the frame's
    rows: its pooled vector, and its score where its head gives one (`lm_score`)."""
    table = pd.read_parquet(folder)
    vector = join_pair_table(frame, table, "lm_embedding")
    score = join_pair_table(frame, table, "lm_score") if "lm_score" in table else None
    return NlpFeature(name, kind, vector, score)
