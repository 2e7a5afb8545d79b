"""A training frame (pandas, from Feast) -> tensors the trainers consume.

Categorical columns get vocabularies built from the training split only (index 0 is
"unknown or missing", so a key never seen in training gets no fitted embedding). CTR
history enters as logit(ctr) and log1p(count); a missing value (an online lookup of a key
never seen in training) is filled with the prior a never-seen key gets offline: the global
training CTR and 0 impressions. A spec's numeric features are standardised with the mean and
standard deviation of the training rows (a missing value becomes the training mean, 0). Extra
dense columns (an LM's score) enter as they are.
Texts for the LM are the (query, ad) pair of a row; each unique pair is tokenised once, up
front, and batches refer to it by index.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from nlpctr.atomic import JsonObject
from nlpctr.compat import as_manifest
from nlpctr.layout import Manifest
from nlpctr.models.schema import SPLITS


@dataclass(frozen=True)
class FeatureColumns:
    categorical: tuple[str, ...]
    ctr: tuple[str, ...]  # smoothed CTRs in (0, 1)
    counts: tuple[str, ...]  # impression counts behind them
    cascade: tuple[str, ...] = ()  # precomputed text vectors (lists of floats)
    scores: tuple[str, ...] = ()  # extra dense scalars used as they are (an LM's logit)
    numeric: tuple[str, ...] = ()  # the spec's numeric features, standardised on training rows

    @classmethod
    def for_manifest(
        cls, manifest: Manifest | JsonObject, cascade: Sequence[str] = (), scores: Sequence[str] = ()
    ) -> FeatureColumns:
        """E0's inputs for a prepared dataset: ids, context columns, each entity's CTR history and
        the spec's numeric features, under the names a Feast lookup gives them
        (`ctr_<entity>__<entity>_ctr`, `numeric__<feature>`)."""
        manifest = as_manifest(manifest)
        ids = ["ad_id"] + (["query_id"] if manifest.spec_column("query_id") else [])
        categorical = tuple(dict.fromkeys([*ids, *manifest.context_columns]))
        entities = manifest.entities
        return cls(
            categorical=categorical,
            ctr=tuple(f"ctr_{e}__{e}_ctr" for e in entities),
            counts=tuple(f"ctr_{e}__{e}_impressions" for e in entities),
            cascade=tuple(cascade),
            scores=tuple(scores),
            numeric=tuple(f"numeric__{n}" for n in manifest.numeric_columns),
        )


Vocabularies = dict[str, dict[str, int]]
# Per numeric column: (mean, standard deviation) over the training rows.
NumericStats = tuple[tuple[float, float], ...]


def numeric_stats_of(values: Iterable[np.ndarray]) -> NumericStats:
    """(mean, sd) of each column's training values, nulls (NaN) left out; an sd of 0 (a
    constant column) or a column with no value is scaled by 1, so it encodes as 0."""
    stats = []
    for column in values:
        present = column[~np.isnan(column)]
        mean = float(present.mean()) if len(present) else 0.0
        sd = float(present.std()) if len(present) else 0.0
        stats.append((mean, sd if sd > 0 else 1.0))
    return tuple(stats)


def fit_numeric_stats(frame: pd.DataFrame, columns: Sequence[str]) -> NumericStats:
    """`numeric_stats_of` the frame's training rows."""
    train = frame[frame["split"] == SPLITS[0]]
    return numeric_stats_of(train[c].astype("float64").to_numpy() for c in columns)


def vocabulary(values: Iterable[str]) -> dict[str, int]:
    """Index of each distinct training value, from 1 in sorted order (0 is unknown or missing)."""
    return {value: i + 1 for i, value in enumerate(sorted(set(values)))}


def build_vocabularies(frame: pd.DataFrame, columns: Sequence[str]) -> Vocabularies:
    train = frame[frame["split"] == SPLITS[0]]
    return {column: vocabulary(train[column].dropna().astype(str).unique()) for column in columns}


@dataclass
class Tensors:
    """One dataset as tensors; rows in the frame's order."""

    categorical: torch.Tensor  # (N, C) long
    dense: torch.Tensor  # (N, D) float
    cascade: tuple[torch.Tensor, ...]  # each (N, d) float
    impressions: torch.Tensor  # (N,) float
    clicks: torch.Tensor  # (N,) float
    text_index: torch.Tensor  # (N,) long: index into `texts`
    texts: list[tuple[str | None, str]]  # unique (query_text, ad_text) pairs
    split: np.ndarray
    groups: np.ndarray
    impression_id: np.ndarray

    def rows(self, split: str) -> torch.Tensor:
        return torch.as_tensor(np.flatnonzero(self.split == split))

    def rows_in(self, split: str) -> int:
        return int(np.count_nonzero(self.split == split))

    def take(self, rows: torch.Tensor) -> Tensors:
        """These rows as a batch; `texts` is shared, so `text_index` still points into it."""
        index = rows.numpy()
        return Tensors(
            categorical=self.categorical[rows],
            dense=self.dense[rows],
            cascade=tuple(c[rows] for c in self.cascade),
            impressions=self.impressions[rows],
            clicks=self.clicks[rows],
            text_index=self.text_index[rows],
            texts=self.texts,
            split=self.split[index],
            groups=self.groups[index],
            impression_id=self.impression_id[index],
        )

    def to(self, device: torch.device) -> Tensors:
        """The model's inputs and the labels on `device`; `text_index` stays on the CPU, where the
        texts it indexes are (the same object back when they are there already)."""
        if self.dense.device == device:
            return self
        move = {"categorical": self.categorical, "dense": self.dense}
        move |= {"impressions": self.impressions, "clicks": self.clicks}
        moved = {name: tensor.to(device) for name, tensor in move.items()}
        return replace(self, cascade=tuple(c.to(device) for c in self.cascade), **moved)

    def batches(
        self, split: str, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Tensors]:
        """A split's rows in batches: shuffled by `generator`, else in order (see BatchSource)."""
        rows = self.rows(split)
        if generator is not None:
            rows = rows[torch.randperm(len(rows), generator=generator)]
        for start in range(0, len(rows), batch_size):
            yield self.take(rows[start : start + batch_size])

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        return tuple(int(self.categorical[:, i].max()) + 1 for i in range(self.categorical.shape[1]))


class BatchSource(Protocol):
    """Where the training loop gets its rows: in-memory `Tensors`, or parquet shards streamed
    in bounded memory (`models.streaming.ShardSource`). Every batch is a `Tensors`."""

    def rows_in(self, split: str) -> int: ...

    def batches(
        self, split: str, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Tensors]:
        """A split's rows: shuffled (seeded by `generator`) when one is given, else in order."""
        ...


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _vectors(values: pd.Series, dim: int | None) -> torch.Tensor:
    """A column of float lists -> (N, d); a missing vector (no query text) becomes zeros."""
    present = [np.asarray(v, dtype=np.float32) for v in values if v is not None and not _is_nan(v)]
    dim = dim if dim is not None else (len(present[0]) if present else 0)
    zeros = np.zeros(dim, dtype=np.float32)
    rows = [zeros if v is None or _is_nan(v) else np.asarray(v, dtype=np.float32) for v in values]
    return torch.as_tensor(np.stack(rows)) if rows else torch.zeros((0, dim))


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and np.isnan(value)


def tensorize(
    frame: pd.DataFrame,
    columns: FeatureColumns,
    group: str,
    vocabularies: Vocabularies | None = None,
    fill_ctr: float = 0.5,
    cascade_dims: Sequence[int] | None = None,
    numeric_stats: NumericStats | None = None,
) -> tuple[Tensors, Vocabularies]:
    """Tensors for a training frame; pass `vocabularies` (and `numeric_stats`) to encode new
    rows like a trained model.

    `fill_ctr` replaces a missing CTR (use the global training CTR), `cascade_dims` fixes the
    width of vector columns that may be all null; a missing score counts as logit 0.
    """
    frame = frame.sort_values("impression_id", kind="stable").reset_index(drop=True)
    vocabularies = vocabularies or build_vocabularies(frame, columns.categorical)
    categorical = (
        np.stack(
            [
                frame[c].astype("string").map(vocabularies[c]).fillna(0).to_numpy(dtype=np.int64)
                for c in columns.categorical
            ],
            axis=1,
        )
        if columns.categorical
        else np.zeros((len(frame), 0), dtype=np.int64)
    )
    ctr = frame[list(columns.ctr)].astype("float64").fillna(fill_ctr).to_numpy(dtype=np.float64)
    counts = frame[list(columns.counts)].astype("float64").fillna(0.0).to_numpy(dtype=np.float64)
    scores = frame[list(columns.scores)].astype("float64").fillna(0.0)
    stats = numeric_stats if numeric_stats is not None else fit_numeric_stats(frame, columns.numeric)
    numeric = frame[list(columns.numeric)].astype("float64").to_numpy(dtype=np.float64)
    if stats:
        numeric = (numeric - np.array([m for m, _ in stats])) / np.array([s for _, s in stats])
    numeric = np.nan_to_num(numeric, nan=0.0)  # a missing value: the training mean
    parts = [_logit(ctr), np.log1p(counts), numeric, scores.to_numpy(dtype=np.float64)]
    dense = np.concatenate(parts, axis=1).astype(np.float32)
    dims = list(cascade_dims) if cascade_dims is not None else [None] * len(columns.cascade)
    cascade = tuple(_vectors(frame[c], d) for c, d in zip(columns.cascade, dims, strict=True))
    query = frame["query_text"] if "query_text" in frame else pd.Series([None] * len(frame))
    pairs = list(zip(query.where(query.notna(), None), frame["ad_text"], strict=True))
    unique: dict[tuple[str | None, str], int] = {}
    text_index = np.array([unique.setdefault(pair, len(unique)) for pair in pairs], dtype=np.int64)
    tensors = Tensors(
        categorical=torch.as_tensor(categorical),
        dense=torch.as_tensor(dense),
        cascade=cascade,
        impressions=torch.as_tensor(frame["impressions"].to_numpy(dtype=np.float32)),
        clicks=torch.as_tensor(frame["clicks"].to_numpy(dtype=np.float32)),
        text_index=torch.as_tensor(text_index),
        texts=list(unique),
        split=frame["split"].to_numpy(dtype=object),
        groups=frame[group].astype("string").fillna("").to_numpy(dtype=object),
        impression_id=frame["impression_id"].to_numpy(dtype=object),
    )
    return tensors, vocabularies
