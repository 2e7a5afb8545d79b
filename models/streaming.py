"""Training frames larger than memory: parquet shards -> batches of `Tensors`, in bounded memory.

`features.store.write_training_shards` writes a service's training frame as
`<root>/<split>/part-*.parquet` (rows in impression_id order, row groups of a few 10k rows).
`ShardSource` reads it back one block of row groups at a time and turns each block into
`Tensors` with the run's own `tensorize` (so streamed and in-memory rows become the same
tensors), and is a `models.data.BatchSource`, so `models.trainer.fit` trains on it unchanged.

Training order is a seeded block shuffle: the row groups in a random order, `shuffle_rows` rows
at a time permuted together. Evaluation reads in order.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from nlpctr.models import sql
from nlpctr.models.data import (
    FeatureColumns,
    NumericStats,
    Tensors,
    Vocabularies,
    numeric_stats_of,
    vocabulary,
)
from nlpctr.models.schema import SPLITS

SHUFFLE_ROWS = 262_144  # rows permuted together; ~100 MB of a baseline frame
READ_COLUMNS = ("impression_id", "split", "impressions", "clicks", "query_text", "ad_text")


def split_files(root: Path, split: str) -> list[Path]:
    return sorted((Path(root) / split).glob("*.parquet"))


def shard_columns(root: Path) -> list[str]:
    """The columns of the shards under `root` (every shard has the service's schema)."""
    files = [p for split in SPLITS for p in split_files(root, split)]
    if not files:
        raise FileNotFoundError(f"no parquet shards under {root}")
    return pq.read_schema(files[0]).names


def needed_columns(columns: FeatureColumns, group: str) -> list[str]:
    """What `tensorize` reads from a frame (and nothing else: vectors are the big columns)."""
    wanted = [
        *READ_COLUMNS,
        group,
        *columns.categorical,
        *columns.ctr,
        *columns.counts,
        *columns.cascade,
        *columns.scores,
        *columns.numeric,
    ]
    return list(dict.fromkeys(wanted))


def fit_numeric_stats(root: Path, columns: Sequence[str]) -> NumericStats:
    """`data.fit_numeric_stats` over the training shards, one column at a time."""
    files = split_files(root, SPLITS[0])
    values = [
        np.concatenate(
            [np.empty(0)] + [pq.read_table(p, columns=[c])[c].cast(pa.float64()).to_numpy() for p in files]
        )
        for c in columns
    ]
    return numeric_stats_of(values)


def fit_vocabularies(root: Path, columns: Sequence[str]) -> Vocabularies:
    """`build_vocabularies` over the training shards, one column at a time."""
    files = split_files(root, SPLITS[0])
    out = {}
    for column in columns:
        distinct: set[str] = set()
        for path in files:
            values = pq.read_table(path, columns=[column])[column].drop_null()
            distinct.update(pc.unique(pc.cast(values, pa.string())).to_pylist())
        out[column] = vocabulary(distinct)
    return out


def first_vector_width(root: Path, column: str) -> int | None:
    """Width of the first non-null vector of a column in the training shards (None: all null)."""
    for path in split_files(root, SPLITS[0]):
        file = pq.ParquetFile(path)
        for group in range(file.num_row_groups):
            values = file.read_row_group(group, columns=[column])[column].drop_null()
            if len(values):
                return len(values[0].as_py())
    return None


def split_totals(root: Path, split: str) -> tuple[int, int, int]:
    """(rows, impressions, clicks) of a split, read column-wise."""
    rows = impressions = clicks = 0
    for path in split_files(root, split):
        table = pq.read_table(path, columns=["impressions", "clicks"])
        rows += table.num_rows
        impressions += int(pc.sum(table["impressions"]).as_py() or 0)
        clicks += int(pc.sum(table["clicks"]).as_py() or 0)
    return rows, impressions, clicks


class ShardSource:
    """A `BatchSource` over parquet shards: each block of rows -> `to_tensors(frame)`."""

    def __init__(
        self,
        root: Path,
        to_tensors: Callable[[pd.DataFrame], Tensors],
        columns: Sequence[str],
        shuffle_rows: int = SHUFFLE_ROWS,
    ) -> None:
        self.root = Path(root)
        self.to_tensors = to_tensors
        self.columns = list(columns)
        self.shuffle_rows = shuffle_rows
        self._rows: dict[str, int] = {}

    def rows_in(self, split: str) -> int:
        if split not in self._rows:
            self._rows[split] = sum(
                pq.ParquetFile(p).metadata.num_rows for p in split_files(self.root, split)
            )
        return self._rows[split]

    def _row_groups(self, split: str) -> list[tuple[Path, int]]:
        return [
            (path, group)
            for path in split_files(self.root, split)
            for group in range(pq.ParquetFile(path).num_row_groups)
        ]

    def _read(self, parts: Sequence[tuple[Path, int]]) -> Tensors:
        tables = [pq.ParquetFile(path).read_row_group(g, columns=self.columns) for path, g in parts]
        return self.to_tensors(pa.concat_tables(tables).to_pandas())

    def blocks(self, split: str, generator: torch.Generator | None = None) -> Iterator[Tensors]:
        """Blocks of rows as Tensors: a row group at a time in order, or (with a generator) the
        row groups in a seeded random order, grouped to about `shuffle_rows` rows."""
        parts = self._row_groups(split)
        if generator is None:
            for part in parts:
                yield self._read([part])
            return
        order = torch.randperm(len(parts), generator=generator).tolist()
        block: list[tuple[Path, int]] = []
        rows = 0
        for i in order:
            path, group = parts[i]
            block.append((path, group))
            rows += pq.ParquetFile(path).metadata.row_group(group).num_rows
            if rows >= self.shuffle_rows:
                yield self._read(block)
                block, rows = [], 0
        if block:
            yield self._read(block)

    def batches(
        self, split: str, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Tensors]:
        for block in self.blocks(split, generator):
            n = len(block.impression_id)
            rows = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
            for start in range(0, n, batch_size):
                yield block.take(rows[start : start + batch_size])


def unique_text_pairs(root: Path, splits: Sequence[str] = SPLITS) -> pd.DataFrame:
    """One row per (query_text_id, ad_text_id) of the shards, with its texts and earliest time
    (the input of `lm_features.text_pairs`, without holding every impression)."""
    files = [str(p) for s in splits for p in split_files(root, s)]
    probe = pq.read_schema(files[0]).names
    query_id = "query_text_id" if "query_text_id" in probe else "NULL"
    query_text = "query_text" if "query_text" in probe else "NULL"
    with tempfile.TemporaryDirectory() as spill, sql.connect(spill, "1GB") as con:
        frame = con.execute(
            f"SELECT {query_id} AS query_text_id, ad_text_id, "
            f"arg_min({query_text}, event_timestamp) AS query_text, "
            "arg_min(ad_text, event_timestamp) AS ad_text, "
            "min(event_timestamp) AS event_timestamp "
            f"FROM read_parquet({sql.file_list(files)}) GROUP BY ALL ORDER BY 1, 2"
        ).df()
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    return frame
