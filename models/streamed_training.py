"""Training and testing on parquet shards, for training frames larger than memory.

The shards are the service's point-in-time join, written by the feature store
(`features.store.write_training_shards`); here they are read as a stream (`models.streaming.
ShardSource`): the run's preprocessing is fitted on the training shards, the loop reads batches as
they come, and the test pass accumulates metrics (`metrics.StreamingMetrics`) and writes
predictions without keeping either split in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nlpctr.errors import UserError
from nlpctr.models import metrics, streaming
from nlpctr.models.config import encoder_config
from nlpctr.models.data import FeatureColumns, Tensors
from nlpctr.models.encoder import TextEncoder
from nlpctr.models.runs import CHECKPOINTS, PREDICTIONS_FILE, Preprocessing
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import FitResult, predict_batches
from nlpctr.models.training import FitInputs, fit_model

TEXT_CACHE = 300_000  # unique texts whose LM vectors one evaluation pass keeps (<= 460 MB at 384-d)


def stream_source(
    root: Path, with_cascade: bool, manifest: dict[str, Any], fill_ctr: float
) -> tuple[Preprocessing, streaming.ShardSource]:
    """The run's preprocessing fitted on the training shards under `root` (their frozen text
    vectors as cascade inputs `with_cascade`), and a stream of Tensors over the shards."""
    names = pq.read_schema(next(iter(sorted(root.glob("*/*.parquet"))))).names
    cascade = [c for c in names if c.endswith("__embedding")] if with_cascade else []
    columns = FeatureColumns.for_manifest(manifest, cascade=cascade)
    dims = []
    for column in cascade:
        width = streaming.first_vector_width(root, column)
        if width is None:
            raise UserError(f"feature column {column} is null on every row; re-run the job behind it")
        dims.append(width)
    group = manifest["group"]
    vocabularies = streaming.fit_vocabularies(root, columns.categorical)
    pre = Preprocessing(columns, vocabularies, fill_ctr, tuple(dims), group)
    return pre, streaming.ShardSource(root, pre.tensorize, streaming.needed_columns(columns, group))


def streamed_test(
    model: torch.nn.Module, source: streaming.ShardSource, texts: TextBatcher | None, predictions: Path
) -> metrics.StreamingMetrics:
    """One in-order pass over the test shards: metrics accumulated and each batch's predictions
    appended to `predictions` (parquet, published when complete), nothing else kept."""
    scored = metrics.StreamingMetrics()
    staging = predictions.with_name(f".{predictions.name}.tmp")
    schema = pa.schema([("impression_id", pa.string()), ("split", pa.string()), ("p", pa.float64())])
    with pq.ParquetWriter(staging, schema) as writer:

        def each(batch: Tensors, p: np.ndarray) -> None:
            labels = metrics.Labels(
                batch.impressions.numpy().astype(np.int64),
                batch.clicks.numpy().astype(np.int64),
                batch.groups,
            )
            scored.add(labels, p)
            ids = pa.array(batch.impression_id, pa.string())
            writer.write_table(pa.table([ids, pa.array(["test"] * len(p)), pa.array(p)], schema=schema))

        predict_batches(model, source.batches("test", 1024), texts, each)
    staging.replace(predictions)
    return scored


def train_streaming(
    root: Path, with_cascade: bool, inputs: FitInputs, run_dir: Path
) -> tuple[Preprocessing, torch.nn.Module, TextBatcher | None, FitResult, dict[str, Any], float]:
    """`training.fit_ctr` and the test pass on the shards under `root`: (preprocessing, model, LM
    batcher, fit, test report, train CTR); predictions are written to the run folder as they are made."""
    pre, source = stream_source(root, with_cascade, inputs.manifest, inputs.fill_ctr)
    texts = None
    if inputs.fusion:
        lm = TextEncoder(encoder_config(inputs.config), trainable=True)
        with_query = bool(inputs.manifest["spec"]["columns"].get("query_text"))
        texts = TextBatcher(lm, with_query, cache_limit=TEXT_CACHE)
    model, result = fit_model(pre, source, texts, inputs, run_dir / CHECKPOINTS / "ctr")
    _, impressions, clicks = streaming.split_totals(source.root, "train")
    ctr_train = clicks / max(impressions, 1)
    scored = streamed_test(model, source, texts, run_dir / PREDICTIONS_FILE)
    evaluation = inputs.config["evaluation"]
    report = scored.report(
        ctr_train,
        int(evaluation["bootstrap_rounds"]),
        int(evaluation["bootstrap_seed"]),
        int(evaluation["calibration_bins"]),
    )
    return pre, model, texts, result, report, ctr_train
