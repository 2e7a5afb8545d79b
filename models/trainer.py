"""One training loop for every mode (nanoGPT style: plain PyTorch, no framework).

`fit` trains baseline / cascade (`CtrModel`), lm (E2's `TextScorer`) and joint (`CtrModel` with
a text fusion) runs alike; `models.training`, `models.streamed_training`, `models.recipe` and
`models.distill` drive it. Checkpoints: `epoch-<k>.pt` or `best.pt`, and `last.pt` (optimizer,
RNG and position, for an exact resume). Validation, early stopping, resume, `auxiliary_loss`,
`param_groups` and device placement: docs/DESIGN.md, "Modules in detail", trainer.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

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
from nlpctr.models.loop import (
    Evaluation,
    EvaluationEntry,
    LoopState,
    Optimization,
    ParamGroup,
    StageRecord,
    WeightAverage,
    default_train_mode,
    load_weights,
    weights_of,
)
from nlpctr.models.prediction import forward_batch, predict_split
from nlpctr.models.text_batches import TextBatcher
from nlpctr.progress import bar as progress_bar
from nlpctr.progress import note as progress_note

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
    ema_decay: float = 0.0  # > 0: validate and keep an average of the weights (`WeightAverage`)

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
        if not is_number(self.ema_decay) or not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"ema_decay must be a number in [0, 1), got {self.ema_decay!r}")
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


@dataclass
class FitResult:
    best_epoch: int  # epoch of the best evaluation (0 for the starting weights)
    history: list[Evaluation]  # one entry per evaluation
    wall_seconds: float
    train_rows_per_s: float
    best_step: int = 0  # optimizer steps before the best evaluation (0: the starting weights)
    steps: int = 0  # optimizer steps taken
    checkpoint: Path | None = None  # the best weights: `epoch-<k>.pt` or `best.pt`
    eval_seconds: float = 0.0  # of wall_seconds, spent validating
    stages: list[StageRecord] = field(default_factory=list)  # the LM recipe's (models/recipe.py)
    best_index: int = -1  # of the best evaluation in `history`
    rows_seen: int = 0  # training rows the optimizer steps read
    cpu_seconds: float = 0.0  # process CPU time (all threads), evaluations included

    @property
    def best(self) -> Evaluation:
        """The best evaluation's history entry."""
        return self.history[self.best_index]

    def history_json(self) -> list[EvaluationEntry]:
        """`history` as results.json keeps it."""
        return [entry.to_json() for entry in self.history]


def default_param_groups(model: nn.Module, texts: TextBatcher | None, config: LoopConfig) -> list[ParamGroup]:
    """The CTR network (its trainable parameters) at `lr`, the LM's trainable ones at `lm_lr`."""
    groups = [
        {"name": "model", "params": [p for p in model.parameters() if p.requires_grad], "lr": config.lr}
    ]
    lm_params = [p for p in texts.lm.parameters() if p.requires_grad] if texts is not None else []
    if lm_params:
        groups.append({"name": "lm", "params": lm_params, "lr": config.lm_lr})
    return groups


def step_checkpoint(step: int) -> str:
    """The file of the weights evaluated after `step` optimizer steps (`keep_checkpoints`)."""
    return f"step-{step}.pt"


@dataclass
class _Fit:
    """What one `fit` holds fixed while `LoopState` changes: the modules, data and schedule."""

    model: nn.Module
    texts: TextBatcher | None
    data: BatchSource
    config: LoopConfig
    checkpoint_dir: Path
    optimization: Optimization
    n_batches: int  # training batches per epoch
    every: int | None  # optimizer steps between evaluations within an epoch
    stepwise: bool  # the best weights are `best.pt`, not the best epoch's `epoch-<k>.pt`
    progress: bool
    train_mode: Callable[[], None]
    auxiliary_loss: AuxiliaryLoss | None
    device: torch.device
    average: WeightAverage | None  # with `ema_decay`: what is validated and kept

    @property
    def last(self) -> Path:
        return self.checkpoint_dir / LAST

    def evaluated(self) -> AbstractContextManager[None]:
        """The weights that are validated and kept in place within the block."""
        return self.average.applied() if self.average is not None else nullcontext()

    def epoch_bar(self, state: LoopState) -> tqdm:
        return progress_bar(
            show=self.progress,
            total=self.n_batches,
            initial=state.batches_done,
            desc=f"epoch {state.epoch + 1}/{self.config.epochs}",
            leave=False,
        )

    def evaluates_within_epoch(self, state: LoopState) -> bool:
        """Whether the step just taken is followed by an evaluation before the epoch's end."""
        return bool(self.every) and state.step % self.every == 0 and state.batches_done < self.n_batches


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
    start_entry: Evaluation | None = None,
) -> FitResult:
    """Train on the train split, validate, and keep the best evaluation's weights in `model` (and
    `texts.lm`); the same loop for in-memory `Tensors` and streamed shards.

    Args:
        model: the network (`CtrModel`, `TextScorer`); frozen parameters stay out of the optimizer.
        data: the rows (`Tensors`) or a shard stream, with train and valid splits.
        config: the loop's budget, optimizer, schedule and validation settings.
        checkpoint_dir: where `epoch-<k>.pt` / `best.pt` and `last.pt` go; a `last.pt` is resumed.
        texts: the LM and its text batcher, for runs that read text; None for E0 and cascades.
        progress: show progress bars.
        auxiliary_loss: a term added to the click loss from the batch's `text_index` and LM vectors.
        param_groups: optimizer groups replacing the default ones.
        train_mode: puts the modules in training mode (default: the model's, a trainable LM's).
        start_entry: the known evaluation of the starting weights, recorded as step 0.

    Returns:
        A `FitResult`: the history, the best evaluation (whose weights `model` now holds), its
        checkpoint, steps, rows seen and timings.

    Raises:
        ValueError: `auxiliary_loss` without `texts`, or `config.epochs` < 1.
        UserError: a damaged `last.pt` in `checkpoint_dir` (`load_checkpoint`).
    """
    if auxiliary_loss is not None and texts is None:
        raise ValueError("auxiliary_loss is computed from the batch's text vectors: pass texts")
    if config.epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {config.epochs}")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    run = _prepare(
        model,
        data,
        config,
        checkpoint_dir,
        texts,
        param_groups=param_groups,
        train_mode=train_mode,
        stepwise=config.stepwise or start_entry is not None,
        progress=progress,
        auxiliary_loss=auxiliary_loss,
    )
    state = _resume(run)
    started, cpu_started = time.perf_counter(), time.process_time()
    if not state.history:
        _evaluate_start(run, state, start_entry)
    for epoch in range(state.epoch, config.epochs):
        if state.patience_spent(config.patience):
            break
        run.train_mode()
        state.begin_epoch(epoch)
        bar = run.epoch_bar(state)
        for i, batch in enumerate(data.batches("train", config.batch_size, state.generator)):
            if i >= run.n_batches:
                break
            # Trained before an interruption: the same batches, drawn the same way.
            if i < state.batches_done:
                continue
            _step(run, state, batch)
            bar.set_postfix(loss=f"{state.running:.4f}")
            bar.update()
            if run.evaluates_within_epoch(state) and _evaluate_and_keep(run, state):
                break
        bar.close()
        if not state.patience_spent(config.patience):
            state.end_epoch(run.n_batches)
            _evaluate_and_keep(run, state)
        state.batches_done = 0
    return _result(run, state, started, cpu_started)


def _prepare(
    model: nn.Module,
    data: BatchSource,
    config: LoopConfig,
    checkpoint_dir: Path,
    texts: TextBatcher | None,
    *,
    param_groups: Sequence[ParamGroup] | None,
    train_mode: Callable[[], None] | None,
    stepwise: bool,
    progress: bool,
    auxiliary_loss: AuxiliaryLoss | None,
) -> _Fit:
    """Seed the run and build its optimizer and schedule over the planned steps."""
    seed_run(config.seed)
    groups = list(param_groups) if param_groups is not None else default_param_groups(model, texts, config)
    n_batches = math.ceil(data.rows_in("train") / config.batch_size)
    if config.max_batches_per_epoch:
        n_batches = min(n_batches, config.max_batches_per_epoch)
    optimization = Optimization.adamw(
        groups,
        weight_decay=config.weight_decay,
        fused=config.fused_optimizer,
        schedule=(config.warmup_steps, config.decay, n_batches * config.epochs),
        scaler=texts.lm.placement.grad_scaler() if texts is not None else None,
    )
    return _Fit(
        model=model,
        texts=texts,
        data=data,
        config=config,
        checkpoint_dir=checkpoint_dir,
        optimization=optimization,
        n_batches=n_batches,
        every=config.evaluation_interval(n_batches),
        stepwise=stepwise,
        progress=progress,
        train_mode=train_mode or partial(default_train_mode, model, texts),
        auxiliary_loss=auxiliary_loss,
        device=device_of(model),
        average=WeightAverage.of(groups, config.ema_decay),
    )


def _resume(run: _Fit) -> LoopState:
    """The state `last.pt` left (weights loaded into the modules), or a fresh one."""
    if not run.last.exists():
        return LoopState.start(run.config.seed)
    state = load_checkpoint(run.last, run.device, fix=f"delete {run.last} to train this run from its start")
    load_weights(run.model, run.texts, state)
    return LoopState.from_checkpoint(state, run.optimization, run.device, run.average)


def _step(run: _Fit, state: LoopState, batch: Tensors) -> None:
    """One optimizer step on a training batch."""
    batch = batch.to(run.device)
    vector = run.texts.batch_vectors(batch) if run.texts is not None else None
    loss = binomial_loss(forward_batch(run.model, batch, run.texts, vector), batch.impressions, batch.clicks)
    if run.auxiliary_loss is not None:
        loss = loss + run.auxiliary_loss(batch.text_index, vector)
    run.optimization.step(loss)
    if run.average is not None:
        run.average.update()
    state.step += 1
    state.batches_done += 1
    state.rows_seen += len(batch.impressions)
    state.running = loss.item() if state.running is None else 0.95 * state.running + 0.05 * loss.item()


def _evaluate_start(run: _Fit, state: LoopState, start_entry: Evaluation | None) -> None:
    """The step-0 evaluation of the starting weights: known (`start_entry`) or computed when
    `eval_at_start` asks for it."""
    if start_entry is not None:
        _keep(run, state, Evaluation.known_start(start_entry))
        _save_last(run, state)
    elif run.config.eval_at_start:
        _evaluate_and_keep(run, state)


def _evaluate_and_keep(run: _Fit, state: LoopState) -> bool:
    """Validate the current weights (or their average) and keep the evaluation; True when
    patience is spent."""
    began = time.perf_counter()
    with run.evaluated():
        valid_p, valid_labels = predict_split(run.model, run.data, "valid", run.texts)
        entry = Evaluation(
            epoch=state.epoch,
            step=state.step,
            train_loss=None if state.running is None else float(state.running),
            valid_logloss=metrics.logloss(valid_labels, valid_p),
            valid_auc=metrics.auc(valid_labels, valid_p),
        )
        state.eval_seconds += time.perf_counter() - began
        loss = "-" if entry.train_loss is None else f"{entry.train_loss:.4f}"
        progress_note(
            f"epoch {entry.epoch + 1} step {entry.step}: train loss {loss}, valid logloss "
            f"{entry.valid_logloss:.5f}, valid AUC {entry.valid_auc:.4f}",
            show=run.progress,
        )
        _keep(run, state, entry)
    _save_last(run, state)
    run.train_mode()
    return state.patience_spent(run.config.patience)


def _keep(run: _Fit, state: LoopState, entry: Evaluation) -> None:
    """Record an evaluation and checkpoint the weights it validated: as configured, and the best."""
    improved = state.record(entry, run.config.early_stop)
    weights = weights_of(run.model, run.texts)
    if run.config.keep_checkpoints:
        save_checkpoint(weights, run.checkpoint_dir / step_checkpoint(state.step))
    if not run.stepwise:
        save_checkpoint(weights, run.checkpoint_dir / f"epoch-{state.epoch}.pt")
    elif improved:
        save_checkpoint(weights, run.checkpoint_dir / BEST)


def _save_last(run: _Fit, state: LoopState) -> None:
    """`last.pt`, the resume point: the weights training steps, and the loop's state."""
    resume = state.to_checkpoint(run.optimization, run.device, run.average)
    save_checkpoint({**weights_of(run.model, run.texts), **resume}, run.last)


def _result(run: _Fit, state: LoopState, started: float, cpu_started: float) -> FitResult:
    """Load the best evaluation's weights into the modules and report the fit (timed from
    `started`, `cpu_started`)."""
    best = state.best_evaluation
    checkpoint = run.checkpoint_dir / (BEST if run.stepwise else f"epoch-{best.epoch}.pt")
    load_weights(run.model, run.texts, load_checkpoint(checkpoint, run.device))
    wall, seen = time.perf_counter() - started, state.rows_seen
    return FitResult(
        best_epoch=int(best.epoch),
        history=state.history,
        wall_seconds=wall,
        train_rows_per_s=seen / wall if wall > 0 and seen else float("nan"),
        best_step=int(best.step),
        steps=state.step,
        checkpoint=checkpoint,
        eval_seconds=state.eval_seconds,
        best_index=state.best,
        rows_seen=seen,
        cpu_seconds=time.process_time() - cpu_started,
    )
