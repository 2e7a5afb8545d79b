"""Training and testing on parquet shards, for training frames larger than memory.

The shards are the service's point-in-time join, written by the feature store
(`features.store.write_training_shards`); here they are read as a stream (`models.streaming.
ShardSource`): the run's preprocessing is fitted on the training shards, the loop reads batches as
they come, and the test pass accumulates metrics (`streaming_metrics.StreamingMetrics`) and writes
predictions without keeping either split in memory. E2's LM step runs here too, on E0's shards,
with the fit and feature writing of `models.training`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nlpctr.atomic import atomic_path
from nlpctr.errors import UserError
from nlpctr.layout import Manifest, RunLayout
from nlpctr.models import metrics, streaming, streaming_metrics
from nlpctr.models.data import FeatureColumns, Tensors
from nlpctr.models.encoder import TextEncoder
from nlpctr.models.prediction import stream_predictions
from nlpctr.models.runs import Preprocessing
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import FitResult
from nlpctr.models.training import (
    FitInputs,
    LmStep,
    Publish,
    fit_lm_alone,
    fit_model,
    write_lm_checkpoints,
)


def stream_source(
    root: Path, columns: FeatureColumns, manifest: Manifest, fill_ctr: float
) -> tuple[Preprocessing, streaming.ShardSource]:
    """The run's preprocessing of `columns` fitted on the training shards under `root`, and a
    stream of Tensors over the shards."""
    dims = []
    for column in columns.cascade:
        width = streaming.first_vector_width(root, column)
        if width is None:
            raise UserError(f"feature column {column} is null on every row; re-run the job behind it")
        dims.append(width)
    group = manifest.group
    vocabularies = streaming.fit_vocabularies(root, columns.categorical)
    numeric = streaming.fit_numeric_stats(root, columns.numeric)
    pre = Preprocessing(columns, vocabularies, fill_ctr, tuple(dims), group, numeric)
    return pre, streaming.ShardSource(root, pre.tensorize, streaming.needed_columns(columns, group))


def text_batcher(inputs: FitInputs) -> TextBatcher:
    """A trainable LM reading streamed batches: each batch's texts tokenised as they come (rows
    are not all in memory); at inference each text's vector is kept while the weights hold."""
    lm = TextEncoder(inputs.config.encoder, trainable=True, placement=inputs.placement)
    with_query = bool(inputs.manifest.spec_column("query_text"))
    return TextBatcher(lm, with_query)


def scored_split(
    model: torch.nn.Module,
    source: streaming.ShardSource,
    split: str,
    texts: TextBatcher | None,
    each: Callable[[Tensors, np.ndarray], None] | None = None,
) -> streaming_metrics.StreamingMetrics:
    """One in-order pass over a split's shards, its metrics accumulated; each batch and its
    probabilities also go to `each` when given. Nothing else is kept."""
    scored = streaming_metrics.StreamingMetrics()

    def add(batch: Tensors, p: np.ndarray) -> None:
        labels = metrics.Labels(
            batch.impressions.numpy().astype(np.int64),
            batch.clicks.numpy().astype(np.int64),
            batch.groups,
        )
        scored.add(labels, p)
        if each is not None:
            each(batch, p)

    stream_predictions(model, source.batches(split, 1024), texts, add)
    return scored


def streamed_test(
    model: torch.nn.Module, source: streaming.ShardSource, texts: TextBatcher | None, predictions: Path
) -> streaming_metrics.StreamingMetrics:
    """In-order passes over the test and the validation shards: the test metrics accumulated and
    each batch's predictions appended to `predictions` (parquet, published when complete),
    nothing else kept. Validation predictions are kept for the controls, compared on validation."""
    schema = pa.schema([("impression_id", pa.string()), ("split", pa.string()), ("p", pa.float64())])
    with atomic_path(predictions) as staging, pq.ParquetWriter(staging, schema) as writer:

        def writer_of(split: str) -> Callable[[Tensors, np.ndarray], None]:
            def write(batch: Tensors, p: np.ndarray) -> None:
                ids = pa.array(batch.impression_id, pa.string())
                writer.write_table(pa.table([ids, pa.array([split] * len(p)), pa.array(p)], schema=schema))

            return write

        scored = scored_split(model, source, "test", texts, writer_of("test"))
        scored_split(model, source, "valid", texts, writer_of("valid"))
    return scored


def train_streaming(
    root: Path, columns: FeatureColumns, inputs: FitInputs, run_dir: Path
) -> tuple[Preprocessing, torch.nn.Module, TextBatcher | None, FitResult, dict[str, Any], float]:
    """`training.fit_ctr` and the test pass on the shards under `root`, reading `columns`:
    (preprocessing, model, LM batcher, fit, test report, train CTR); predictions are written to
    the run folder as they are made."""
    pre, source = stream_source(root, columns, inputs.manifest, inputs.fill_ctr)
    texts = text_batcher(inputs) if inputs.fusion else None
    model, result = fit_model(pre, source, texts, inputs, RunLayout(run_dir).checkpoints("ctr"))
    _, impressions, clicks = streaming.split_totals(source.root, "train")
    ctr_train = clicks / max(impressions, 1)
    scored = streamed_test(model, source, texts, RunLayout(run_dir).predictions)
    evaluation = inputs.config.evaluation
    report = scored.report(
        ctr_train, evaluation.bootstrap_rounds, evaluation.bootstrap_seed, evaluation.calibration_bins
    )
    return pre, model, texts, result, report, ctr_train


def train_lm_streaming(
    root: Path, inputs: FitInputs, run_dir: Path, data_dir: Path, slug: str, publish: Publish
) -> LmStep:
    """`training.train_lm_alone` on the shards under `root` (E0's service): the same fit and
    feature writing, on a stream. The standalone test AUC comes from a streamed pass (score
    histograms: exact up to scores within 3e-5 in logit); the features are written for the
    shards' unique text pairs."""
    _, source = stream_source(
        root, FeatureColumns.for_manifest(inputs.manifest), inputs.manifest, inputs.fill_ctr
    )
    texts = text_batcher(inputs)
    scorer, result = fit_lm_alone(source, texts, inputs, run_dir)
    test_auc = scored_split(scorer, source, "test", texts).auc()
    pairs = streaming.unique_text_pairs(root)
    return write_lm_checkpoints(
        scorer, texts, result, pairs, test_auc, inputs.config, run_dir, data_dir, slug, publish
    )
