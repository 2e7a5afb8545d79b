"""The LM recipe of E2 and E3, one for both arms so that their LMs compare on equal footing.

LP-FT: stage 0 (`head`, the probe), stage 1 (`lm`, on `lm_loop`'s budget), for E3 optionally
stage 2 (`all`); each stage is one `models.trainer.fit`, validated at its step 0 and keeping
its best state. Driven by `pipelines/train_modes.py`. Design: docs/DESIGN.md, "The experiment
protocol" (One LM, one recipe; Joint training rule) and "Modules in detail", recipe.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TypedDict

from torch import nn

from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError
from nlpctr.models.ctr_net import CtrModel
from nlpctr.models.data import BatchSource
from nlpctr.models.loop import Evaluation, ParamGroup, StageRates, StageRecord
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import FitResult, LoopConfig, fit
from nlpctr.progress import note

HEAD, LM, ALL = "head", "lm", "all"


@dataclass(frozen=True)
class ProbeConfig:
    """Stage 0: the click head alone on the frozen LM's vectors, validated at each epoch end."""

    epochs: int = 0  # 0: no probe
    batch_size: int = 256
    lr: float = 1e-3
    patience: int = 2


@dataclass(frozen=True)
class Stage2Config:
    """E3's optional stage 2: from stage 1's best, E0's tower trains too."""

    epochs: int = 0  # 0: no stage 2 (E2 has no tower, so its budget would differ)
    tower_lr: float = 1e-5
    head_lr: float = 1e-4
    lm_lr: float = 2e-5


@dataclass(frozen=True)
class RecipeConfig:
    """`recipe:` of models/configs/default.yaml; stage 1's budget and rates are `lm_loop`'s."""

    probe: ProbeConfig = field(default_factory=ProbeConfig)
    lm_stage: bool = True  # False: the probe alone (the probe-only control)
    stage2: Stage2Config = field(default_factory=Stage2Config)

    @classmethod
    def from_dict(cls, values: JsonObject | None) -> RecipeConfig:
        values = dict(values or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"recipe: unknown keys {sorted(unknown)}")
        defaults = cls()
        probe = replace(defaults.probe, **dict(values.get("probe") or {}))  # TypeError on an unknown key
        stage2 = replace(defaults.stage2, **dict(values.get("stage2") or {}))
        config = cls(probe, bool(values.get("lm_stage", defaults.lm_stage)), stage2)
        if probe.epochs < 0 or probe.batch_size < 1 or probe.patience < 1 or probe.lr <= 0:
            raise UserError(
                f"recipe.probe needs epochs >= 0, batch_size and patience >= 1 and lr > 0, got {probe}"
            )
        if stage2.epochs < 0 or min(stage2.tower_lr, stage2.head_lr, stage2.lm_lr) < 0:
            raise UserError(f"recipe.stage2 needs epochs >= 0 and learning rates >= 0, got {stage2}")
        if not config.lm_stage and not probe.epochs:
            raise UserError("recipe: without the LM stage (lm_stage: false) the probe needs epochs > 0")
        return config


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a run: its checkpoint folder, loop and each parameter group's learning rate
    (0: the group is frozen)."""

    name: str  # head | lm | all
    folder: str
    loop: LoopConfig
    tower_lr: float
    head_lr: float
    lm_lr: float


def plan(
    lm_loop: LoopConfig, recipe: RecipeConfig, *, warm_started: bool, has_tower: bool, tower_lr: float
) -> list[PlannedStage]:
    """The stages a run goes through: probe, LM stage, stage 2 (each when configured).

    Args:
        lm_loop: stage 1's loop (budget, optimizer, schedule); its `lr` is the head's.
        recipe: the probe, whether stage 1 runs, and stage 2.
        warm_started: E3 from a trained E0 (a probe needs a trained tower); E2 counts as warm.
        has_tower: E3 (a CTR tower that stage 1 freezes) rather than E2.
        tower_lr: a cold E3's tower rate.

    Raises:
        UserError: when no stage would run.
    """
    stages = []
    if recipe.probe.epochs and (warm_started or not has_tower):
        probe = recipe.probe
        probe_loop = replace(
            lm_loop,
            epochs=probe.epochs,
            batch_size=probe.batch_size,
            patience=probe.patience,
            max_batches_per_epoch=None,  # full epochs: a step costs what an E0 step costs
            eval_every_steps=None,  # validated at epoch ends: patience counts epochs
            evals_per_epoch=None,
            warmup_steps=0,
            decay="none",
            keep_checkpoints=False,
            ema_decay=0.0,  # the LM stage's: the probe is the same stage as its control's
        )
        stages.append(PlannedStage(HEAD, "stage0", probe_loop, 0.0, probe.lr, 0.0))
    if recipe.lm_stage:
        if has_tower and not warm_started:
            stages.append(PlannedStage(ALL, "stage1", lm_loop, tower_lr, lm_loop.lr, lm_loop.lm_lr))
        else:
            stages.append(PlannedStage(LM, "stage1", lm_loop, 0.0, lm_loop.lr, lm_loop.lm_lr))
    second = recipe.stage2
    if has_tower and warm_started and recipe.lm_stage and second.epochs:
        loop = replace(lm_loop, epochs=second.epochs, warmup_steps=0, keep_checkpoints=False)
        stages.append(PlannedStage(ALL, "stage2", loop, second.tower_lr, second.head_lr, second.lm_lr))
    if not stages:
        raise UserError("the LM recipe has no stage to run: give the probe epochs or keep the LM stage")
    return stages


def head_of(model: nn.Module) -> nn.Module:
    """The click head a recipe trains: a `CtrModel`'s fusion, or the whole `TextScorer`."""
    if isinstance(model, CtrModel):
        if model.fusion is None:
            raise ValueError("joint training needs a model with a text fusion")
        return model.fusion
    return model


def param_groups(
    model: nn.Module, texts: TextBatcher, tower_lr: float, head_lr: float, lm_lr: float
) -> list[ParamGroup]:
    """Tower, head and LM, each with its learning rate; a group at lr 0 is frozen (its parameters
    get requires_grad=False and stay out of the optimizer)."""
    head = head_of(model)
    groups = []
    if isinstance(model, CtrModel):
        model.tower.requires_grad_(tower_lr > 0)
        if tower_lr > 0:
            groups.append({"name": "tower", "params": list(model.tower.parameters()), "lr": tower_lr})
    head.requires_grad_(head_lr > 0)
    if head_lr > 0:
        groups.append({"name": "head", "params": list(head.parameters()), "lr": head_lr})
    lm = [p for p in texts.lm.parameters() if p.requires_grad]
    if lm and lm_lr > 0:
        groups.append({"name": "lm", "params": lm, "lr": lm_lr})
    return groups


def _train_mode(model: nn.Module, texts: TextBatcher, frozen_tower: bool) -> Callable[[], None]:
    def train_mode() -> None:
        model.train()
        if frozen_tower and isinstance(model, CtrModel):
            model.tower.eval()  # E0's logit exactly: no dropout in a tower that does not learn
        texts.lm.train(any(p.requires_grad for p in texts.lm.parameters()))

    return train_mode


def stage_record(stage: PlannedStage, result: FitResult, offset: int, lm_frozen: bool) -> StageRecord:
    """What results.json keeps of a stage: its steps, rows, seconds and validation at start and best."""
    best = result.best
    return {
        "name": stage.name,
        "steps": result.steps,
        "rows_seen": result.rows_seen,
        "evaluations": len(result.history),
        "start_valid_logloss": result.history[0].valid_logloss,
        "start_valid_auc": result.history[0].valid_auc,
        "best_valid_logloss": best.valid_logloss,
        "best_valid_auc": best.valid_auc,
        "best_step": best.step + offset,
        "lr": {"tower": stage.tower_lr, "head": stage.head_lr, "lm": 0.0 if lm_frozen else stage.lm_lr},
        "batch_size": stage.loop.batch_size,
        "warmup_steps": stage.loop.warmup_steps,
        "decay": stage.loop.decay,
        "ema_decay": stage.loop.ema_decay,
        "wall_seconds": result.wall_seconds,
        "cpu_seconds": result.cpu_seconds,
    }


def fit_recipe(
    model: nn.Module,
    data: BatchSource,
    stages: list[PlannedStage],
    checkpoint_dir: Path,
    texts: TextBatcher,
    progress: bool = True,
) -> FitResult:
    """Train `model` (a `CtrModel` with a fusion, or a `TextScorer`) and `texts.lm` through the
    planned stages; returns the last stage's best (weights in `model` and `texts.lm`) with the
    run's merged history (`stage`, and `step` counted across stages) and `stages` records."""
    lm_frozen = all(not p.requires_grad for p in texts.lm.parameters())
    texts.prefill()  # every text's frozen-prefix states, computed once, the same way on a resume
    history: list[Evaluation] = []
    records: list[StageRecord] = []
    results: list[FitResult] = []
    offset, start_entry = 0, None
    started = time.perf_counter()
    for stage in stages:
        with texts.frozen_lm() if stage.name == HEAD else nullcontext():
            groups = param_groups(model, texts, stage.tower_lr, stage.head_lr, stage.lm_lr)
            rates = ", ".join(f"{g.get('name', '')} {g['lr']:g}" for g in groups)
            note(f"{stage.folder} ({stage.name}): lr {rates}", show=progress)
            result = fit(
                model,
                data,
                replace(stage.loop, eval_at_start=True),
                checkpoint_dir / stage.folder,
                texts=texts,
                progress=progress,
                param_groups=groups,
                train_mode=_train_mode(model, texts, frozen_tower=stage.tower_lr == 0),
                start_entry=start_entry,
            )
        results.append(result)
        history += [replace(entry, stage=stage.name, step=entry.step + offset) for entry in result.history]
        records.append(stage_record(stage, result, offset, lm_frozen))
        start_entry = result.best
        offset += result.steps
    if isinstance(model, CtrModel):
        model.tower.requires_grad_(True)
    head_of(model).requires_grad_(True)
    last = results[-1]
    return FitResult(
        best_epoch=last.best_epoch,
        history=history,
        wall_seconds=time.perf_counter() - started,
        train_rows_per_s=_rows_per_s(results),
        best_step=last.best_step + offset - last.steps,
        steps=offset,
        checkpoint=last.checkpoint,
        eval_seconds=sum(r.eval_seconds for r in results),
        stages=records,
        best_index=len(history) - len(last.history) + last.best_index,
        rows_seen=sum(r.rows_seen for r in results),
        cpu_seconds=sum(r.cpu_seconds for r in results),
    )


def _rows_per_s(results: list[FitResult]) -> float:
    rows, seconds = sum(r.rows_seen for r in results), sum(r.wall_seconds for r in results)
    return rows / seconds if rows and seconds > 0 else float("nan")


BUDGET_KEYS = (
    "steps",
    "rows_seen",
    "batch_size",
    "lr",
    "warmup_steps",
    "decay",
    "wall_seconds",
    "cpu_seconds",
)


class StageBudget(TypedDict):
    """A stage's budget, the `BUDGET_KEYS` of its `StageRecord`."""

    steps: int
    rows_seen: int
    batch_size: int
    lr: StageRates
    warmup_steps: int
    decay: str
    wall_seconds: float
    cpu_seconds: float


def budget(stages: list[StageRecord]) -> dict[str, StageBudget]:
    """Each stage's budget (steps, rows seen, batch, rates, schedule, seconds), by stage name:
    what results.json records so that two arms' budgets can be compared."""
    return {s["name"]: StageBudget(**{k: s[k] for k in BUDGET_KEYS}) for s in stages}


def lm_stage_of(result: FitResult) -> StageRecord | None:
    """The record of a run's LM stage (`lm` or a cold `all`), None for a probe-only run."""
    return next((s for s in result.stages if s["name"] in (LM, ALL)), None)


def stage_summary(stages: list[StageRecord]) -> str:
    """`head 0.25178 -> 0.24700 (4396 steps); lm ...` for one-line summaries."""
    return "; ".join(
        f"{s['name']} {s['start_valid_logloss']:.5f} -> {s['best_valid_logloss']:.5f} ({s['steps']} steps)"
        for s in stages
    )
