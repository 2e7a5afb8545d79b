"""One training loop for every mode (nanoGPT style: plain PyTorch, no framework).

Modes differ only in the model handed in and whether an LM encodes the row's text:
- baseline / cascade: `CtrModel` on ID, context, CTR-history (and cascade vector) inputs;
- lm (the E2 standalone LM): `TextScorer`, the LM plus a head, on text alone;
- joint: `CtrModel` with a text fusion, LM fine-tuned end to end.

Each unique text of a batch is encoded once and padded to the batch's longest text.

Validation runs at every epoch end and, with `eval_every_steps` = K, every K optimizer steps;
with `eval_at_start`, also on the starting weights (step 0: a warm start is a candidate, so a
run never keeps a state worse than the one it started from). Each evaluation is one `history`
entry (epoch, step, train loss, valid log loss and AUC); the best one's weights are kept and
early stopping counts `patience` evaluations without improvement. Checkpoints are state dicts
(loadable with `weights_only=True`): per epoch (`epoch-<k>.pt`) when validating at epoch ends
only, else `best.pt`; `last.pt`, written at every evaluation, also holds the optimizer and RNG
states and the position in the epoch, so an interrupted run resumes where it stopped (mid-epoch
included) and ends with the same weights as an uninterrupted one. An optional `auxiliary_loss`
adds a term computed from the batch's texts to the click loss (SuKD's distance to a teacher, in
`models/distill.py`); `param_groups` replaces the default optimizer groups (the CTR network at
`lr`, the LM at `lm_lr`), e.g. the LM recipe's tower / head / LM (`models/recipe.py`).

The loop runs where the model is (`models/device.py`): each batch moves to the model's device,
the LM runs at its own precision (`TextEncoder.placement`; fp16 adds a `GradScaler`), and
checkpoints load onto that device (`map_location`), so a run started on a GPU resumes on a CPU
and the other way round (on CUDA, `last.pt` also keeps the CUDA RNG and the scaler's state).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nlpctr.config_files import check_integer, is_number
from nlpctr.errors import UserError
from nlpctr.models import metrics
from nlpctr.models.checkpoints import load_checkpoint, save_checkpoint
from nlpctr.models.ctr_net import binomial_loss
from nlpctr.models.data import BatchSource, Tensors
from nlpctr.models.device import device_of, seed_run
from nlpctr.models.text_batches import TextBatcher

LAST = "last.pt"
BEST = "best.pt"

DECAYS = ("none", "linear", "cosine")

# (text_index, text_vector) of a batch's rows -> a scalar added to the click loss.
AuxiliaryLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LoopConfig:
    """One `fit`. The defaults are `loop:` of models/configs/default.yaml (tests/test_config.py
    keeps them equal): the YAML configures `nlpctr train`, these serve code that builds a loop directly."""

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    lm_lr: float = 5e-5
    weight_decay: float = 1e-5
    patience: int = 3  # evaluations without improvement before stopping
    early_stop: str = "logloss"  # or "auc" (the E2 LM stops at peak validation AUC)
    seed: int = 0
    max_batches_per_epoch: int | None = None  # quick runs and tests
    eval_every_steps: int | None = None  # also validate every K steps; None or 0: at epoch ends only
    eval_at_start: bool = False  # also validate the starting weights (step 0)
    fused_optimizer: bool = True  # AdamW's fused kernel: no per-step temporaries (same math, other rounding)
    warmup_steps: int = 0  # learning rates rise linearly from 0 over these optimizer steps
    decay: str = "none"  # after warmup: "none" (constant), "linear" or "cosine" to 0 at the planned last step
    keep_checkpoints: bool = False  # also keep every evaluation's weights (`step-<k>.pt`)
    evals_per_epoch: int | None = None  # also validate this many times per epoch, evenly spaced

    def __post_init__(self) -> None:
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "patience": self.patience}
        optional = {
            "max_batches_per_epoch": self.max_batches_per_epoch,
            "evals_per_epoch": self.evals_per_epoch,
        }
        for name, value in {**positive, **{k: v for k, v in optional.items() if v is not None}}.items():
            check_integer(name, value)
        if self.eval_every_steps is not None:
            check_integer("eval_every_steps", self.eval_every_steps, low=0)
        for name in ("lr", "lm_lr", "weight_decay"):
            value = getattr(self, name)
            if not is_number(value) or not math.isfinite(value) or value < 0:
                raise UserError(f"{name} must be a number >= 0, got {value!r}")
        check_integer("warmup_steps", self.warmup_steps, low=0)
        if self.decay not in DECAYS:
            raise UserError(f"decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if self.early_stop not in ("logloss", "auc"):
            raise UserError(f"early_stop must be logloss or auc, got {self.early_stop!r}")

    @property
    def stepwise(self) -> bool:
        """Whether evaluations happen other than at epoch ends (then the best is `best.pt`)."""
        return bool(self.eval_every_steps) or bool(self.evals_per_epoch) or self.eval_at_start

    def evaluation_interval(self, batches_per_epoch: int) -> int | None:
        """Optimizer steps between evaluations within an epoch (None: at epoch ends only)."""
        intervals = [self.eval_every_steps] if self.eval_every_steps else []
        if self.evals_per_epoch:
            intervals.append(max(math.ceil(batches_per_epoch / self.evals_per_epoch), 1))
        return min(intervals) if intervals else None


class TextScorer(nn.Module):
    """The E2 LM head: a logit from the pooled text vector alone. With `base_rate`, its output
    bias starts at that click rate's log-odds, so training starts from the base rate instead of
    spending its first steps learning it from p = 0.5."""

    def __init__(self, text_dim: int, hidden: int = 64, base_rate: float | None = None) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.Linear(text_dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        if base_rate is not None:
            if not 0.0 < base_rate < 1.0:
                raise ValueError(f"base_rate must be in (0, 1), got {base_rate}")
            with torch.no_grad():
                self.head[-1].bias.fill_(math.log(base_rate / (1.0 - base_rate)))

    def forward(self, text_vector: torch.Tensor) -> torch.Tensor:
        return self.head(text_vector).squeeze(-1)


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
    to it and keeps nothing (a pass over more rows than memory holds). Batches run on the
    model's device; the probabilities come back to the CPU."""
    model.eval()
    if texts is not None:
        texts.lm.eval()
    out = []
    with torch.inference_mode():
        for batch in batches:
            p = torch.sigmoid(forward_batch(model, batch, texts)).cpu().numpy().astype(np.float64)
            if each is not None:
                each(batch, p)
            else:
                out.append(p)
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
    best_epoch: int  # epoch of the best evaluation (0 for the starting weights)
    history: list[dict[str, Any]]  # one entry per evaluation
    wall_seconds: float
    train_rows_per_s: float
    best_step: int = 0  # optimizer steps before the best evaluation (0: the starting weights)
    steps: int = 0  # optimizer steps taken
    checkpoint: Path | None = None  # the best weights: `epoch-<k>.pt` or `best.pt`
    eval_seconds: float = 0.0  # of wall_seconds, spent validating
    stages: list[dict[str, Any]] = field(default_factory=list)  # the LM recipe's (models/recipe.py)
    best_index: int = -1  # of the best evaluation in `history`
    rows_seen: int = 0  # training rows the optimizer steps read
    cpu_seconds: float = 0.0  # process CPU time (all threads), evaluations included

    @property
    def best(self) -> dict[str, Any]:
        """The best evaluation's history entry."""
        return self.history[self.best_index]


def _score(history_entry: Mapping[str, Any], early_stop: str) -> float:
    """Higher is better."""
    return history_entry["valid_auc"] if early_stop == "auc" else -history_entry["valid_logloss"]


ParamGroup = dict[str, Any]  # torch.optim group: params, lr, optional weight_decay and name


def default_param_groups(model: nn.Module, texts: TextBatcher | None, config: LoopConfig) -> list[ParamGroup]:
    """The CTR network (its trainable parameters) at `lr`, the LM's trainable ones at `lm_lr`."""
    groups = [
        {"name": "model", "params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr}
    ]
    lm_params = [p for p in texts.lm.parameters() if p.requires_grad] if texts is not None else []
    if lm_params:
        groups.append({"name": "lm", "params": lm_params, "lr": config.lm_lr})
    return groups


def lr_factor(step: int, warmup: int, decay: str, total: int) -> float:
    """The learning rate's multiplier before optimizer step `step` (0-based) of `total` planned."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return 1.0
    done = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 1.0 - done if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


def step_checkpoint(step: int) -> str:
    """The file of the weights evaluated after `step` optimizer steps (`keep_checkpoints`)."""
    return f"step-{step}.pt"


def fit(
    model: nn.Module,
    data: BatchSource,
    config: LoopConfig,
    checkpoint_dir: Path,
    texts: TextBatcher | None = None,
    progress: bool = True,
    auxiliary_loss: AuxiliaryLoss | None = None,
    *,
    param_groups: Sequence[ParamGroup] | None = None,
    train_mode: Callable[[], None] | None = None,
    start_entry: Mapping[str, Any] | None = None,
) -> FitResult:
    """Train on the train split, validate (see the module docstring), keep the best evaluation's
    weights in `model` (and `texts.lm`).

    `data` is in-memory `Tensors` or a stream of parquet shards; the loop is the same. Parameters
    with `requires_grad=False` (a frozen tower) are left out of the default optimizer groups.
    `auxiliary_loss` gets the batch's `text_index` and LM vectors (in-memory data: indices into
    `data.texts`). `train_mode` puts the modules in training mode (default: `model.train()` and the
    LM's train mode when it has trainable parameters). `start_entry` (valid_logloss, valid_auc) is
    the known evaluation of the starting weights: recorded as the step-0 entry, not recomputed.
    """
    if auxiliary_loss is not None and texts is None:
        raise ValueError("auxiliary_loss is computed from the batch's text vectors: pass texts")
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    device = device_of(model)
    scaler = texts.lm.placement.grad_scaler() if texts is not None else None
    seed_run(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    groups = list(param_groups) if param_groups is not None else default_param_groups(model, texts, config)
    trained = [g for g in groups if g["params"]]
    # Every group frozen (a recipe stage with all learning rates 0): the planned steps still run,
    # validated and checkpointed as configured, and update nothing. AdamW refuses no group at all.
    optimizer = torch.optim.AdamW(
        trained or [{"params": [], "lr": 0.0}],
        weight_decay=config.weight_decay,
        fused=config.fused_optimizer or None,
    )
    train_rows = data.rows_in("train")
    stepwise = config.stepwise or start_entry is not None
    n_batches = math.ceil(train_rows / config.batch_size)
    if config.max_batches_per_epoch:
        n_batches = min(n_batches, config.max_batches_per_epoch)
    planned = n_batches * config.epochs
    every = config.evaluation_interval(n_batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.decay, planned)
    )

    def set_train_mode() -> None:
        if train_mode is not None:
            train_mode()
            return
        model.train()
        if texts is not None:
            texts.lm.train(any(p.requires_grad for p in texts.lm.parameters()))

    history: list[dict[str, Any]] = []
    best, stale, step, running = -1, 0, 0, None  # best: index into history
    start_epoch, skip = 0, 0  # skip: batches of start_epoch already trained (a mid-epoch resume)
    resumed_rows = 0
    last = checkpoint_dir / LAST
    if last.exists():
        state = load_checkpoint(last, device, fix=f"delete {last} to train this run from its start")
        _load_weights(model, texts, state)
        optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        if "scaler" in state and scaler is not None:
            scaler.load_state_dict(state["scaler"])
        history = json.loads(state["history"])
        best, stale = int(state.get("best", state.get("best_epoch", -1))), int(state["stale"])
        step, running = int(state.get("step", 0)), state.get("running")
        resumed_rows = int(state.get("rows_seen", 0))
        if state.get("epoch_done", True):  # (checkpoints without the key were written at epoch ends)
            start_epoch = int(state["epoch"]) + 1
            generator.set_state(state["generator"].cpu())
        else:
            start_epoch, skip = int(state["epoch"]), int(state["batches_done"])
            generator.set_state(state["epoch_generator"].cpu())

    started, cpu_started, seen, evaluating = time.perf_counter(), time.process_time(), resumed_rows, 0.0
    epoch_generator = generator.get_state()

    def record(entry: dict[str, Any], epoch: int, batches_done: int, epoch_done: bool) -> bool:
        """Keep an evaluation: history, best weights, resume point; True when patience is spent."""
        nonlocal best, stale
        history.append(entry)
        improved = best < 0 or _score(entry, config.early_stop) > _score(history[best], config.early_stop)
        best, stale = (len(history) - 1, 0) if improved else (best, stale + 1)
        weights = _weights(model, texts)
        if config.keep_checkpoints:
            save_checkpoint(weights, checkpoint_dir / step_checkpoint(step))
        if not stepwise:
            save_checkpoint(weights, checkpoint_dir / f"epoch-{epoch}.pt")
        elif improved:
            save_checkpoint(weights, checkpoint_dir / BEST)
        resume = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
            "epoch_generator": epoch_generator,
            "torch_rng": torch.get_rng_state(),
            "history": json.dumps(history),
            "epoch": epoch,
            "epoch_done": epoch_done,
            "batches_done": batches_done,
            "step": step,
            "rows_seen": seen,
            "running": running,
            "best": best,
            "best_epoch": int(history[best]["epoch"]),
            "stale": stale,
        }
        if device.type == "cuda":  # dropout draws from the device's generator there
            resume["cuda_rng"] = torch.cuda.get_rng_state(device)
        if scaler is not None:
            resume["scaler"] = scaler.state_dict()
        save_checkpoint({**weights, **resume}, last)
        return stale >= config.patience

    def evaluate(epoch: int, batches_done: int, epoch_done: bool) -> bool:
        nonlocal evaluating
        began = time.perf_counter()
        valid_p, valid_labels = predict_split(model, data, "valid", texts)
        entry = {
            "epoch": epoch,
            "step": step,
            "train_loss": None if running is None else float(running),
            "valid_logloss": metrics.logloss(valid_labels, valid_p),
            "valid_auc": metrics.auc(valid_labels, valid_p),
        }
        evaluating += time.perf_counter() - began
        if progress:
            loss = "-" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}"
            tqdm.write(
                f"epoch {epoch + 1} step {step}: train loss {loss}, valid logloss "
                f"{entry['valid_logloss']:.5f}, valid AUC {entry['valid_auc']:.4f}"
            )
        stop = record(entry, epoch, batches_done, epoch_done)
        set_train_mode()
        return stop

    stop = stale >= config.patience
    if not history and (config.eval_at_start or start_entry is not None) and config.epochs > 0:
        if start_entry is not None:
            entry = {"epoch": 0, "step": 0, "train_loss": None}
            entry.update({k: float(start_entry[k]) for k in ("valid_logloss", "valid_auc")})
            stop = record(entry, 0, 0, False)
        else:
            stop = evaluate(0, 0, False)
    for epoch in range(start_epoch, config.epochs):
        if stop:
            break
        set_train_mode()
        if not skip:
            epoch_generator = generator.get_state()
        bar = tqdm(
            total=n_batches,
            initial=skip,
            desc=f"epoch {epoch + 1}/{config.epochs}",
            disable=not progress,
            leave=False,
        )
        for i, batch in enumerate(data.batches("train", config.batch_size, generator)):
            if i >= n_batches:
                break
            if i < skip:  # trained before the interruption: the same batches, drawn the same way
                continue
            batch = batch.to(device)
            vector = texts.batch_vectors(batch) if texts is not None else None
            loss = binomial_loss(forward_batch(model, batch, texts, vector), batch.impressions, batch.clicks)
            if auxiliary_loss is not None:
                loss = loss + auxiliary_loss(batch.text_index, vector)
            optimizer.zero_grad(set_to_none=True)
            if trained and scaler is None:
                loss.backward()
                optimizer.step()
            elif trained:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            if trained:  # nothing to update, nothing to schedule
                scheduler.step()
            step += 1
            seen += len(batch.impressions)
            running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
            bar.set_postfix(loss=f"{running:.4f}")
            bar.update()
            if every and step % every == 0 and i + 1 < n_batches:
                stop = evaluate(epoch, i + 1, False)
                if stop:
                    break
        bar.close()
        skip = 0
        if not stop:
            stop = evaluate(epoch, n_batches, True)

    entry = history[best]
    checkpoint = checkpoint_dir / (BEST if stepwise else f"epoch-{entry['epoch']}.pt")
    _load_weights(model, texts, load_checkpoint(checkpoint, device))
    wall = time.perf_counter() - started
    return FitResult(
        best_epoch=int(entry["epoch"]),
        history=history,
        wall_seconds=wall,
        train_rows_per_s=seen / wall if wall > 0 and seen else float("nan"),
        best_step=int(entry["step"]),
        steps=step,
        checkpoint=checkpoint,
        eval_seconds=evaluating,
        best_index=best,
        rows_seen=seen,
        cpu_seconds=time.process_time() - cpu_started,
    )


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
