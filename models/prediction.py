"""Click probabilities from a trained network: a batch's logits (`forward_batch`), and passes
over rows, batches or a whole split that keep or stream what they predict. `models.trainer`
validates with them; evaluation, scoring and distillation predict with them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from nlpctr.models import metrics
from nlpctr.models.ctr_net import TextScorer
from nlpctr.models.data import BatchSource, Tensors
from nlpctr.models.device import device_of
from nlpctr.models.text_batches import TextBatcher


def forward_batch(
    model: nn.Module, batch: Tensors, texts: TextBatcher | None, text_vector: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of a batch (moved to the model's device); `text_vector` is its rows' LM vectors when
    the caller has encoded them."""
    batch = batch.to(device_of(model))
    if text_vector is None and texts is not None:
        text_vector = texts.batch_vectors(batch)
    if isinstance(model, TextScorer):  # reads the text alone, none of the row's other inputs
        if text_vector is None:
            raise ValueError("a TextScorer scores the rows' text vectors: pass texts")
        return model(text_vector)
    return model(batch.categorical, batch.dense, batch.cascade, text_vector)


def stream_predictions(
    model: nn.Module,
    batches: Iterable[Tensors],
    texts: TextBatcher | None,
    each: Callable[[Tensors, np.ndarray], None],
) -> None:
    """Hands each batch's click probabilities to `each` and keeps nothing (a pass over more rows
    than memory holds). Batches run on the model's device; the probabilities come back to the CPU."""
    model.eval()
    if texts is not None:
        texts.lm.eval()
    with torch.inference_mode():
        for batch in batches:
            each(batch, torch.sigmoid(forward_batch(model, batch, texts)).cpu().numpy().astype(np.float64))


def predict_batches(model: nn.Module, batches: Iterable[Tensors], texts: TextBatcher | None) -> np.ndarray:
    """Click probabilities of batches, in order (`stream_predictions` keeps none)."""
    out: list[np.ndarray] = []
    stream_predictions(model, batches, texts, lambda _, p: out.append(p))
    return np.concatenate(out) if out else np.empty(0)


def predict(
    model: nn.Module, data: Tensors, rows: torch.Tensor, texts: TextBatcher | None, batch_size: int = 1024
) -> np.ndarray:
    """Click probabilities for rows, in order."""
    chunks = (data.take(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size))
    return predict_batches(model, chunks, texts)


def predict_split(
    model: nn.Module, data: BatchSource, split: str, texts: TextBatcher | None, batch_size: int = 1024
) -> tuple[np.ndarray, metrics.Labels]:
    """Probabilities and labels of a split's rows, in the source's order."""
    impressions: list[np.ndarray] = []
    clicks: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    predictions: list[np.ndarray] = []

    def keep(batch: Tensors, p: np.ndarray) -> None:
        impressions.append(batch.impressions.numpy().astype(np.int64))
        clicks.append(batch.clicks.numpy().astype(np.int64))
        groups.append(batch.groups)
        predictions.append(p)

    stream_predictions(model, data.batches(split, batch_size), texts, keep)
    if not predictions:
        return np.empty(0), metrics.Labels(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, object))
    labels = metrics.Labels(np.concatenate(impressions), np.concatenate(clicks), np.concatenate(groups))
    return np.concatenate(predictions), labels


def labels_of(data: Tensors, rows: torch.Tensor) -> metrics.Labels:
    index = rows.numpy()
    return metrics.Labels(
        data.impressions[rows].numpy().astype(np.int64),
        data.clicks[rows].numpy().astype(np.int64),
        data.groups[index],
    )
