"""One training loop for every mode (nanoGPT style: plain PyTorch, no framework).

Modes differ only in the model handed in and whether an LM encodes the row's text:
- baseline / cascade: `CtrModel` on ID, context, CTR-history (and cascade vector) inputs;
- lm (the E2 standalone LM): `TextScorer`, the LM plus a head, on text alone;
- joint: `CtrModel` with a text fusion, LM fine-tuned end to end.

Each unique text of a batch is encoded once and padded to the batch's longest text. Every
epoch is checkpointed (state dicts, loadable with `weights_only=True`); `last.pt` also holds
the optimizer and RNG states, so an interrupted run resumes where it stopped and ends with
the same weights as an uninterrupted one. An optional `auxiliary_loss` adds a term computed from
the batch's texts to the click loss (SuKD's distance to a teacher, in `models/distill.py`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nlpctr.models import metrics
from nlpctr.models.ctr_net import binomial_loss
from nlpctr.models.data import BatchSource, Tensors
from nlpctr.models.encoder import TextEncoder

LAST = "last.pt"

# (text_index, text_vector) of a batch's rows -> a scalar added to the click loss.
AuxiliaryLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LoopConfig:
    epochs: int = 3
    batch_size: int = 256
    lr: float = 1e-3
    lm_lr: float = 5e-5
    weight_decay: float = 1e-5
    patience: int = 2
    early_stop: str = "logloss"  # or "auc" (the E2 LM stops at peak validation AUC)
    seed: int = 0
    max_batches_per_epoch: int | None = None  # quick runs and tests


class TextScorer(nn.Module):
    """The E2 LM head: a logit from the pooled text vector alone."""

    def __init__(self, text_dim: int, hidden: int = 64) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(text_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(
        self,
        categorical: torch.Tensor,
        dense: torch.Tensor,
        cascade: tuple[torch.Tensor, ...] = (),
        text_vector: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert text_vector is not None
        return self.head(text_vector).squeeze(-1)


def pair_text(query: str | None, ad: str) -> str:
    """What the LM reads for a row: the ad text, after the query when there is one."""
    return f"{query} [SEP] {ad}" if query else ad


@dataclass
class TextBatcher:
    """A batch of rows -> the LM's vectors, one forward per unique (query, ad) text of the batch.

    `for_data` tokenises an in-memory dataset's texts once up front. A streamed batch carries
    its own texts (`Tensors.texts`), tokenised as it comes; with `cache_limit`, inference
    (`predict_batches`) also keeps each text's vector for the rest of the pass, so a text
    repeated across batches is encoded once per pass.
    """

    lm: TextEncoder
    tokens: list[list[int]] = field(default_factory=list)
    texts: list[tuple[str | None, str]] | None = None  # what `tokens` tokenised
    cache_limit: int = 0
    cache: dict[tuple[str | None, str], torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_data(cls, lm: TextEncoder, data: Tensors) -> TextBatcher:
        return cls(lm, [lm.token_ids(pair_text(q, a)) for q, a in data.texts], data.texts)

    def vectors(self, text_index: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(text_index, return_inverse=True)
        batch = self.lm.pad([self.tokens[i] for i in unique.tolist()])
        return self.lm(**batch)[inverse]

    def batch_vectors(self, batch: Tensors) -> torch.Tensor:
        if batch.texts is self.texts:
            return self.vectors(batch.text_index)
        unique, inverse = torch.unique(batch.text_index, return_inverse=True)
        pairs = [batch.texts[i] for i in unique.tolist()]
        caching = self.cache_limit > 0 and not torch.is_grad_enabled()
        todo = [p for p in pairs if p not in self.cache] if caching else pairs
        encoded = (
            self.lm(**self.lm.pad([self.lm.token_ids(pair_text(q, a)) for q, a in todo])) if todo else None
        )
        if not caching:
            assert encoded is not None
            return encoded[inverse]
        fresh = dict(zip(todo, encoded, strict=True)) if encoded is not None else {}
        if len(self.cache) < self.cache_limit:
            self.cache.update(fresh)
        return torch.stack([self.cache[p] if p in self.cache else fresh[p] for p in pairs])[inverse]


def forward_batch(
    model: nn.Module, batch: Tensors, texts: TextBatcher | None, text_vector: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of a batch; `text_vector` is its rows' LM vectors when the caller has encoded them."""
    if text_vector is None and texts is not None:
        text_vector = texts.batch_vectors(batch)
    return model(batch.categorical, batch.dense, batch.cascade, text_vector)


def forward_rows(
    model: nn.Module,
    data: Tensors,
    rows: torch.Tensor,
    texts: TextBatcher | None,
    text_vector: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of rows; `text_vector` is the rows' LM vectors when the caller has already encoded them."""
    return forward_batch(model, data.take(rows), texts, text_vector)


def predict_batches(
    model: nn.Module,
    batches: Iterable[Tensors],
    texts: TextBatcher | None,
    each: Callable[[Tensors, np.ndarray], None] | None = None,
) -> np.ndarray | None:
    """Click probabilities of batches, in order; with `each`, hands each batch's probabilities
    to it and keeps nothing (a pass over more rows than memory holds)."""
    model.eval()
    if texts is not None:
        texts.lm.eval()
        texts.cache.clear()  # vectors of another pass may come from other weights
    out = []
    with torch.inference_mode():
        for batch in batches:
            p = torch.sigmoid(forward_batch(model, batch, texts)).numpy().astype(np.float64)
            if each is not None:
                each(batch, p)
            else:
                out.append(p)
    if texts is not None:
        texts.cache.clear()
    if each is not None:
        return None
    return np.concatenate(out) if out else np.empty(0)


def predict(
    model: nn.Module, data: Tensors, rows: torch.Tensor, texts: TextBatcher | None, batch_size: int = 1024
) -> np.ndarray:
    """Click probabilities for rows, in order."""
    chunks = (data.take(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size))
    p = predict_batches(model, chunks, texts)
    assert p is not None
    return p


def predict_split(
    model: nn.Module, data: BatchSource, split: str, texts: TextBatcher | None, batch_size: int = 1024
) -> tuple[np.ndarray, metrics.Labels]:
    """Probabilities and labels of a split's rows, in the source's order."""
    impressions: list[np.ndarray] = []
    clicks: list[np.ndarray] = []
    groups: list[np.ndarray] = []

    def keep(batch: Tensors, p: np.ndarray) -> None:
        impressions.append(batch.impressions.numpy().astype(np.int64))
        clicks.append(batch.clicks.numpy().astype(np.int64))
        groups.append(batch.groups)
        predictions.append(p)

    predictions: list[np.ndarray] = []
    predict_batches(model, data.batches(split, batch_size), texts, keep)
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


@dataclass
class FitResult:
    best_epoch: int
    history: list[dict[str, float]]
    wall_seconds: float
    train_rows_per_s: float


def _score(history_entry: dict[str, float], early_stop: str) -> float:
    """Higher is better."""
    return history_entry["valid_auc"] if early_stop == "auc" else -history_entry["valid_logloss"]


def fit(
    model: nn.Module,
    data: BatchSource,
    config: LoopConfig,
    checkpoint_dir: Path,
    texts: TextBatcher | None = None,
    progress: bool = True,
    auxiliary_loss: AuxiliaryLoss | None = None,
) -> FitResult:
    """Train on the train split, early-stop on valid, keep the best epoch's weights in `model`.

    `data` is in-memory `Tensors` or a stream of parquet shards; the loop is the same. Parameters
    with `requires_grad=False` (a frozen tower) are left out of the optimizer. `auxiliary_loss`
    gets the batch's `text_index` and LM vectors (in-memory data: indices into `data.texts`).
    """
    if auxiliary_loss is not None and texts is None:
        raise ValueError("auxiliary_loss is computed from the batch's text vectors: pass texts")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    lm_params = list(texts.lm.parameters()) if texts is not None else []
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr}]
    if any(p.requires_grad for p in lm_params):
        groups.append({"params": [p for p in lm_params if p.requires_grad], "lr": config.lm_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    train_rows = data.rows_in("train")

    history: list[dict[str, float]] = []
    start_epoch, best_epoch, stale = 0, -1, 0
    last = checkpoint_dir / LAST
    if last.exists():
        state = torch.load(last, weights_only=True)
        _load_weights(model, texts, state)
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history = json.loads(state["history"])
        start_epoch, best_epoch, stale = (
            int(state["epoch"]) + 1,
            int(state["best_epoch"]),
            int(state["stale"]),
        )

    started, seen = time.perf_counter(), 0
    for epoch in range(start_epoch, config.epochs):
        if stale >= config.patience:
            break
        model.train()
        if texts is not None:
            texts.lm.train(any(p.requires_grad for p in lm_params))
        n_batches = math.ceil(train_rows / config.batch_size)
        if config.max_batches_per_epoch:
            n_batches = min(n_batches, config.max_batches_per_epoch)
        bar = tqdm(
            total=n_batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False
        )
        running = None
        for step, batch in enumerate(data.batches("train", config.batch_size, generator)):
            if step >= n_batches:
                break
            vector = texts.batch_vectors(batch) if texts is not None else None
            loss = binomial_loss(forward_batch(model, batch, texts, vector), batch.impressions, batch.clicks)
            if auxiliary_loss is not None:
                loss = loss + auxiliary_loss(batch.text_index, vector)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(batch.impressions)
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
            bar.update()
        bar.close()
        valid_p, valid_labels = predict_split(model, data, "valid", texts)
        entry = {
            "epoch": epoch,
            "train_loss": float(running if running is not None else float("nan")),
            "valid_logloss": metrics.logloss(valid_labels, valid_p),
            "valid_auc": metrics.auc(valid_labels, valid_p),
        }
        history.append(entry)
        if progress:
            tqdm.write(
                f"epoch {epoch + 1}: train loss {entry['train_loss']:.4f}, valid logloss "
                f"{entry['valid_logloss']:.4f}, valid AUC {entry['valid_auc']:.4f}"
            )
        improved = best_epoch < 0 or _score(entry, config.early_stop) > _score(
            history[best_epoch], config.early_stop
        )
        best_epoch, stale = (epoch, 0) if improved else (best_epoch, stale + 1)
        weights = _weights(model, texts)
        torch.save(weights, checkpoint_dir / f"epoch-{epoch}.pt")
        torch.save(
            {
                **weights,
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": json.dumps(history),
                "epoch": epoch,
                "best_epoch": best_epoch,
                "stale": stale,
            },
            checkpoint_dir / f".{LAST}.tmp",
        )
        (checkpoint_dir / f".{LAST}.tmp").replace(last)  # atomic: a crash never leaves half a checkpoint

    best = torch.load(checkpoint_dir / f"epoch-{best_epoch}.pt", weights_only=True)
    _load_weights(model, texts, best)
    wall = time.perf_counter() - started
    return FitResult(best_epoch, history, wall, seen / wall if wall > 0 and seen else float("nan"))


def _weights(model: nn.Module, texts: TextBatcher | None) -> dict[str, dict[str, torch.Tensor]]:
    weights = {"model": model.state_dict()}
    if texts is not None:
        weights["lm"] = texts.lm.state_dict()
    return weights


def _load_weights(model: nn.Module, texts: TextBatcher | None, state: dict) -> None:
    model.load_state_dict(state["model"])
    if texts is not None and "lm" in state:
        texts.lm.load_state_dict(state["lm"])


def config_dict(config: LoopConfig) -> dict:
    return asdict(config)
