"""What `models.trainer.fit` changes as it trains, apart from the weights (transformers'
`TrainerState`, nanoGPT's loop variables): the position in the data, the evaluations and the
early-stopping count (`LoopState`), and what steps the weights (`Optimization`).

`last.pt` holds the weights and `LoopState.to_checkpoint()`; `LoopState.from_checkpoint()` is its
inverse, so a run interrupted anywhere between two evaluations resumes to the same weights as an
uninterrupted one (the batch order, dropout and the optimizer's moments included).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

import torch
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn

if TYPE_CHECKING:
    from nlpctr.models.text_batches import TextBatcher


# Optional keys by a total=False subclass, not NotRequired: under postponed annotations Python
# 3.11's TypedDict cannot see NotRequired.
class _Group(TypedDict):
    params: list[nn.Parameter]
    lr: float


class ParamGroup(_Group, total=False):
    """A torch.optim parameter group as the trainer builds it: its parameters and rate, and a name."""

    name: str
    weight_decay: float


class _Entry(TypedDict):
    epoch: int
    step: int
    train_loss: float | None
    valid_logloss: float
    valid_auc: float


class EvaluationEntry(_Entry, total=False):
    """An `Evaluation` as results.json's `history` (and `last.pt`) keeps it."""

    stage: str


class StageRates(TypedDict):
    """A recipe stage's learning rates (0.0 where a part is frozen)."""

    tower: float
    head: float
    lm: float


class StageRecord(TypedDict):
    """What results.json keeps of one LM-recipe stage (`models/recipe.py` `stage_record`)."""

    name: str
    steps: int
    rows_seen: int
    evaluations: int
    start_valid_logloss: float
    start_valid_auc: float
    best_valid_logloss: float
    best_valid_auc: float
    best_step: int
    lr: StageRates
    batch_size: int
    warmup_steps: int
    decay: str
    ema_decay: float
    wall_seconds: float
    cpu_seconds: float


class _LoopFields(TypedDict):
    optimizer: dict[str, Any]  # torch's own state_dict formats, saved and loaded as they are
    scheduler: dict[str, Any]
    generator: torch.Tensor
    epoch_generator: torch.Tensor
    torch_rng: torch.Tensor
    history: str  # the EvaluationEntry list as JSON text
    epoch: int
    epoch_done: bool
    batches_done: int
    step: int
    rows_seen: int
    running: float | None
    best: int
    best_epoch: int
    stale: int


class LoopCheckpoint(_LoopFields, total=False):
    """The resume part of `last.pt`, beside the weights (`LoopState.to_checkpoint`)."""

    cuda_rng: torch.Tensor  # on CUDA
    scaler: dict[str, Any]  # with fp16's GradScaler
    average: list[torch.Tensor]  # with `ema_decay`: the averaged weights (`WeightAverage.shadow`)


def lr_factor(step: int, warmup: int, decay: str, total: int) -> float:
    """The learning rate's multiplier before optimizer step `step` (0-based) of `total` planned."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "none" or total <= warmup:
        return 1.0
    done = min((step - warmup) / max(total - warmup, 1), 1.0)
    return 1.0 - done if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))


class _ModelWeights(TypedDict):
    model: dict[str, torch.Tensor]


class Weights(_ModelWeights, total=False):
    """A checkpoint's weights: the model's state dict and, with a trainable LM, the LM's."""

    lm: dict[str, torch.Tensor]


def weights_of(model: nn.Module, texts: TextBatcher | None) -> Weights:
    """A checkpoint's weights: the model's and, with texts, the LM's."""
    weights: Weights = {"model": model.state_dict()}
    if texts is not None:
        weights["lm"] = texts.lm.state_dict()
    return weights


def load_weights(model: nn.Module, texts: TextBatcher | None, state: Weights) -> None:
    model.load_state_dict(state["model"])
    if texts is not None and "lm" in state:
        texts.lm.load_state_dict(state["lm"])


def default_train_mode(model: nn.Module, texts: TextBatcher | None) -> None:
    """`model.train()`, and the LM's train mode when it has trainable parameters."""
    model.train()
    if texts is not None:
        texts.lm.train(any(p.requires_grad for p in texts.lm.parameters()))


@dataclass(frozen=True)
class Evaluation:
    """One validation of a fit: a `history` entry (results.json keeps its `to_json()`)."""

    epoch: int  # the epoch it ended or interrupted (0-based)
    step: int  # optimizer steps before it
    train_loss: float | None  # the smoothed training loss then (None: nothing trained yet)
    valid_logloss: float
    valid_auc: float
    stage: str | None = None  # the LM recipe's stage (models/recipe.py); None within one fit

    def score(self, early_stop: str) -> float:
        """Higher is better."""
        return self.valid_auc if early_stop == "auc" else -self.valid_logloss

    def to_json(self) -> EvaluationEntry:
        entry: EvaluationEntry = {
            "epoch": self.epoch,
            "step": self.step,
            "train_loss": self.train_loss,
            "valid_logloss": self.valid_logloss,
            "valid_auc": self.valid_auc,
        }
        if self.stage is not None:
            entry["stage"] = self.stage
        return entry

    @classmethod
    def from_json(cls, entry: EvaluationEntry) -> Evaluation:
        return cls(**entry)

    @classmethod
    def known_start(cls, start: Evaluation) -> Evaluation:
        """The step-0 entry of a fit whose starting weights `start` evaluated (a recipe stage
        starting from the one before's best): recorded, not recomputed."""
        return cls(0, 0, None, float(start.valid_logloss), float(start.valid_auc))


@dataclass
class Optimization:
    """What steps the weights: AdamW over the trained parameter groups, its learning-rate
    schedule, and fp16's loss scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    trained: bool  # some group has parameters; else the steps run and update nothing

    @classmethod
    def adamw(
        cls,
        groups: Sequence[ParamGroup],
        *,
        weight_decay: float,
        fused: bool,
        schedule: tuple[int, str, int],
        scaler: torch.amp.GradScaler | None,
    ) -> Optimization:
        """AdamW over the groups with parameters; `schedule` is (warmup steps, decay, planned steps)."""
        trained = [g for g in groups if g["params"]]
        # Every group frozen (a recipe stage with all learning rates 0): the planned steps still run,
        # validated and checkpointed as configured, and update nothing. AdamW refuses no group at all.
        optimizer = torch.optim.AdamW(
            trained or [{"params": [], "lr": 0.0}], weight_decay=weight_decay, fused=fused or None
        )
        warmup, decay, planned = schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, warmup, decay, planned)
        )
        return cls(optimizer, scheduler, scaler, bool(trained))

    def step(self, loss: torch.Tensor) -> None:
        """Backpropagate `loss` and step (and schedule) the optimizer when anything trains."""
        self.optimizer.zero_grad(set_to_none=True)
        if not self.trained:
            return
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.scheduler.step()


@dataclass
class WeightAverage:
    """An exponential moving average of the trained parameters (Polyak averaging), validated and
    kept in place of the raw weights: at a high learning rate the raw weights' step-to-step noise
    costs validation more than their progress gains (docs/RESULTS.md, "The LM stage's start");
    the average keeps the progress and averages the noise out. Training steps the raw weights."""

    params: list[nn.Parameter]
    shadow: list[torch.Tensor]
    decay: float

    @classmethod
    def of(cls, groups: Sequence[ParamGroup], decay: float) -> WeightAverage | None:
        """The average of the groups' parameters, starting at their values; None when `decay` is 0
        or nothing trains (a stage with every rate at 0)."""
        params = [p for group in groups for p in group["params"]]
        if decay <= 0 or not params:
            return None
        return cls(params, [p.detach().clone() for p in params], decay)

    def update(self) -> None:
        """Move the average towards the weights an optimizer step just left."""
        get_ema_multi_avg_fn(self.decay)(self.shadow, [p.detach() for p in self.params], None)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Within the block the parameters hold the average; the raw weights come back after."""
        raw = [p.detach().clone() for p in self.params]
        _copy(self.params, self.shadow)
        try:
            yield
        finally:
            _copy(self.params, raw)

    def load(self, shadow: Sequence[torch.Tensor]) -> None:
        """The average a checkpoint kept (`LoopState.to_checkpoint`)."""
        _copy(self.shadow, shadow)


@torch.no_grad()
def _copy(targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    for target, source in zip(targets, sources, strict=True):
        target.copy_(source)


@dataclass
class LoopState:
    """Everything the loop mutates. The position (`epoch`, `batches_done`) is where training
    continues: a resume skips the epoch's batches already trained, drawn in the same order."""

    generator: torch.Generator  # draws each epoch's batch order
    epoch_generator: torch.Tensor  # the generator's state when `epoch` began (redraws its order)
    epoch: int = 0  # the epoch in progress
    batches_done: int = 0  # of `epoch`, already trained
    epoch_done: bool = False  # `epoch` ended (its end-of-epoch evaluation is the last one)
    step: int = 0  # optimizer steps taken
    rows_seen: int = 0  # training rows the steps read
    running: float | None = None  # the smoothed training loss
    history: list[Evaluation] = field(default_factory=list)
    best: int = -1  # index into `history`
    stale: int = 0  # evaluations since the best
    eval_seconds: float = 0.0  # this process's time validating (not kept across a resume)

    @classmethod
    def start(cls, seed: int) -> LoopState:
        generator = torch.Generator().manual_seed(seed)
        return cls(generator, generator.get_state())

    @property
    def best_evaluation(self) -> Evaluation:
        return self.history[self.best]

    def patience_spent(self, patience: int) -> bool:
        return self.stale >= patience

    def record(self, entry: Evaluation, early_stop: str) -> bool:
        """Add an evaluation; True when it is the best so far."""
        self.history.append(entry)
        improved = self.best < 0 or entry.score(early_stop) > self.best_evaluation.score(early_stop)
        self.best, self.stale = (len(self.history) - 1, 0) if improved else (self.best, self.stale + 1)
        return improved

    def begin_epoch(self, epoch: int) -> None:
        """Enter `epoch`; a fresh one (not a resumed one part-trained) notes where its order is drawn from."""
        self.epoch, self.epoch_done = epoch, False
        if not self.batches_done:
            self.epoch_generator = self.generator.get_state()

    def end_epoch(self, batches: int) -> None:
        self.batches_done, self.epoch_done = batches, True

    def to_checkpoint(
        self, optimization: Optimization, device: torch.device, average: WeightAverage | None = None
    ) -> LoopCheckpoint:
        """The resume part of `last.pt` (beside the weights)."""
        state: LoopCheckpoint = {
            "optimizer": optimization.optimizer.state_dict(),
            "scheduler": optimization.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "epoch_generator": self.epoch_generator,
            "torch_rng": torch.get_rng_state(),
            "history": json.dumps([entry.to_json() for entry in self.history]),
            "epoch": self.epoch,
            "epoch_done": self.epoch_done,
            "batches_done": self.batches_done,
            "step": self.step,
            "rows_seen": self.rows_seen,
            "running": self.running,
            "best": self.best,
            "best_epoch": int(self.best_evaluation.epoch),  # not read on resume; tests/golden digests it
            "stale": self.stale,
        }
        if device.type == "cuda":  # dropout draws from the device's generator there
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        if optimization.scaler is not None:
            state["scaler"] = optimization.scaler.state_dict()
        if average is not None:
            state["average"] = [t.detach().clone() for t in average.shadow]
        return state

    @classmethod
    def from_checkpoint(
        cls,
        state: LoopCheckpoint,
        optimization: Optimization,
        device: torch.device,
        average: WeightAverage | None = None,
    ) -> LoopState:
        """The state `to_checkpoint` wrote, positioned where training continues; restores the
        optimizer, schedule, scaler, weight average and the process's RNGs in place."""
        optimization.optimizer.load_state_dict(state["optimizer"])
        optimization.scheduler.load_state_dict(state["scheduler"])
        if "scaler" in state and optimization.scaler is not None:
            optimization.scaler.load_state_dict(state["scaler"])
        if average is not None and "average" in state:
            average.load(state["average"])
        torch.set_rng_state(state["torch_rng"].cpu())
        if "cuda_rng" in state and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        loop = cls(
            generator=torch.Generator(),
            epoch_generator=state["epoch_generator"].cpu(),
            epoch=int(state["epoch"]),
            batches_done=int(state["batches_done"]),
            step=int(state["step"]),
            rows_seen=int(state["rows_seen"]),
            running=state["running"],
            history=[Evaluation.from_json(entry) for entry in json.loads(state["history"])],
            best=int(state["best"]),
            stale=int(state["stale"]),
        )
        if state["epoch_done"]:  # the next epoch starts from the generator as the last one left it
            loop.epoch, loop.batches_done = loop.epoch + 1, 0
            loop.generator.set_state(state["generator"].cpu())
        else:  # part-way: redraw the epoch's order, then skip the batches trained
            loop.generator.set_state(loop.epoch_generator)
        return loop
