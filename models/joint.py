"""E3's recipe: joint training that starts from E0 and cannot end below it on validation.

BERT4CTR also trains in two steps. Here, from a `CtrModel` warm-started from a trained E0
(`CtrModel.warm_start`: the fusion's output layer at zero, so the model computes E0's logits):

- stage 0 (`head`, when `probe.epochs` > 0): linear probing before fine-tuning (LP-FT, Kumar et
  al. 2022). E0's tower and the whole LM are frozen; each text's vector is computed once
  (`TextBatcher.frozen_lm`), so the fusion head alone trains on full epochs at a CTR batch size
  for seconds. Without it the head starts at zero and learns at the LM's pace: on the simulator
  (rho = 0, results/simulated/joint-budget) 300 LM steps moved the model's logit by 0.05 (sd)
  where the text effect is 0.8, and a frozen embedding fed to E0 recovered 25x more.
- stage 1 (`lm`): E0's tower is frozen (no gradient, eval mode: E0's logit exactly, no dropout);
  the LM's trainable layers and the fusion head learn what E0 misses. The first stage's step 0
  is evaluated, so the run's best is at worst E0 itself; a later stage's step 0 is the stage
  before's best (recorded, not recomputed).
- stage 2 (`all`, when `stage2.epochs` > 0): from stage 1's best, the tower trains too, at its
  own small learning rate. Its step 0 is stage 1's best (recorded, not recomputed), so it can
  only improve on it.

Each stage is one `models.trainer.fit` (its own checkpoint folder, evaluations every
`loop.eval_every_steps` steps, early stopping, exact resume) with three parameter groups, each
with its own learning rate: `tower` (E0's network), `head` (the fusion: the score MLP, or the
projection, the gate and W_u of concat/gate) and `lm` (the LM's trainable layers; embeddings and
the layers below `encoder.trainable_layers` are frozen and cached by `TextEncoder`). A cold run
(no E0 to start from: its tower has everything to learn) is one stage `all`: the tower at
`loop.lr`, the head and the LM at stage 1's rates, for stage 1's epochs.

The run's history is the stages' evaluations in order (`stage`, and `step` counted across
stages); `stages` records, per stage, its steps and its valid log loss at the start and at best.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from nlpctr.errors import UserError
from nlpctr.models.ctr_net import CtrModel
from nlpctr.models.data import BatchSource
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import FitResult, LoopConfig, ParamGroup, fit


@dataclass(frozen=True)
class StageConfig:
    """One stage: how long, and each parameter group's learning rate (0: the group is frozen)."""

    epochs: int | None = None  # None: `loop.epochs`; 0: no such stage. Capped by loop.max_batches_per_epoch
    tower_lr: float = 0.0
    head_lr: float = 1e-3
    lm_lr: float = 1e-4


@dataclass(frozen=True)
class ProbeConfig:
    """Stage 0: the fusion head alone on the frozen LM's vectors, validated at each epoch end."""

    epochs: int = 0  # 0: no such stage
    batch_size: int = 256
    head_lr: float = 1e-3
    patience: int = 2


@dataclass(frozen=True)
class JointConfig:
    """`joint:` of models/configs/default.yaml (a test keeps the two equal)."""

    probe: ProbeConfig = field(default_factory=ProbeConfig)
    stage1: StageConfig = field(
        default_factory=lambda: StageConfig(epochs=None, tower_lr=0.0, head_lr=1e-3, lm_lr=1e-4)
    )
    stage2: StageConfig = field(
        default_factory=lambda: StageConfig(epochs=1, tower_lr=1e-5, head_lr=1e-4, lm_lr=2e-5)
    )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> JointConfig:
        values = dict(values or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"joint: unknown keys {sorted(unknown)}")
        defaults = cls()
        stages = {}
        for name in ("probe", "stage1", "stage2"):
            given = dict(values.get(name) or {})
            stages[name] = replace(getattr(defaults, name), **given)  # TypeError on an unknown key
        config = cls(**stages)
        probe = config.probe
        if probe.epochs < 0 or probe.batch_size < 1 or probe.patience < 1 or probe.head_lr <= 0:
            raise UserError(
                f"joint.probe needs epochs >= 0, batch_size and patience >= 1 and head_lr > 0, got {probe}"
            )
        if config.stage1.tower_lr:
            raise UserError("joint.stage1.tower_lr must be 0: stage 1 trains the LM with E0's tower frozen")
        for name, stage in (("stage1", config.stage1), ("stage2", config.stage2)):
            if stage.epochs is not None and stage.epochs < 0:
                raise UserError(f"joint.{name}.epochs must be >= 0, got {stage.epochs}")
            if min(stage.tower_lr, stage.head_lr, stage.lm_lr) < 0:
                raise UserError(f"joint.{name}: learning rates must be >= 0")
        return config


def param_groups(
    model: CtrModel, texts: TextBatcher, tower_lr: float, head_lr: float, lm_lr: float
) -> list[ParamGroup]:
    """Tower, fusion head and LM, each with its learning rate; a group at lr 0 is frozen (its
    parameters get requires_grad=False and stay out of the optimizer)."""
    if model.fusion is None:
        raise ValueError("joint training needs a model with a text fusion")
    model.tower.requires_grad_(tower_lr > 0)
    groups = []
    if tower_lr > 0:
        groups.append({"name": "tower", "params": list(model.tower.parameters()), "lr": tower_lr})
    if head_lr > 0:
        groups.append({"name": "head", "params": list(model.fusion.parameters()), "lr": head_lr})
    model.fusion.requires_grad_(head_lr > 0)
    lm = [p for p in texts.lm.parameters() if p.requires_grad]
    if lm and lm_lr > 0:
        groups.append({"name": "lm", "params": lm, "lr": lm_lr})
    return groups


def _train_mode(model: CtrModel, texts: TextBatcher, frozen_tower: bool):  # type: ignore[no-untyped-def]
    def train_mode() -> None:
        model.train()
        if frozen_tower:
            model.tower.eval()  # E0's logit exactly: no dropout in a tower that does not learn
        texts.lm.train(any(p.requires_grad for p in texts.lm.parameters()))

    return train_mode


def fit_joint(
    model: CtrModel,
    data: BatchSource,
    loop: LoopConfig,
    joint: JointConfig,
    checkpoint_dir: Path,
    texts: TextBatcher,
    warm_started: bool,
    progress: bool = True,
) -> FitResult:
    """Train a joint model by the recipe above; returns the last stage's best (weights in `model`
    and `texts.lm`) with the run's merged history, `stages` and checkpoint."""
    # (name, checkpoint folder, learning rates, loop) of each stage that runs
    plan: list[tuple[str, str, StageConfig, LoopConfig]] = []
    if warm_started and joint.probe.epochs:
        probe = joint.probe
        probe_loop = replace(
            loop,
            epochs=probe.epochs,
            batch_size=probe.batch_size,
            patience=probe.patience,
            max_batches_per_epoch=None,  # full epochs: a step costs what an E0 step costs
            eval_every_steps=None,
        )
        plan.append(("head", "stage0", StageConfig(probe.epochs, 0.0, probe.head_lr, 0.0), probe_loop))
    stage_plan = [("lm", joint.stage1), ("all", joint.stage2)]
    if not warm_started:
        stage_plan = [("all", replace(joint.stage1, tower_lr=loop.lr))]
    for index, (name, stage) in enumerate(stage_plan):
        if stage.epochs != 0:
            epochs = stage.epochs if stage.epochs is not None else loop.epochs
            plan.append((name, f"stage{index + 1}", stage, replace(loop, epochs=epochs)))
    if not plan:
        raise UserError("joint training has no stage to run: give the probe, stage 1 or stage 2 epochs")
    frozen_lm_lr = all(not p.requires_grad for p in texts.lm.parameters())
    texts.prefill()  # every text's frozen-prefix states, computed once, the same way on a resume
    history: list[dict[str, Any]] = []
    stages: list[dict[str, Any]] = []
    results: list[FitResult] = []
    offset, start_entry = 0, None
    for name, folder, stage, stage_loop in plan:
        frozen = texts.frozen_lm() if name == "head" else nullcontext()
        with frozen:
            groups = param_groups(model, texts, stage.tower_lr, stage.head_lr, stage.lm_lr)
            if progress:
                rates = ", ".join(f"{g['name']} {g['lr']:g}" for g in groups)
                print(f"joint stage {folder[-1]} ({name}): lr {rates}", flush=True)
            result = fit(
                model,
                data,
                replace(stage_loop, eval_at_start=True),
                checkpoint_dir / folder,
                texts=texts,
                progress=progress,
                param_groups=groups,
                train_mode=_train_mode(model, texts, frozen_tower=stage.tower_lr == 0),
                start_entry=start_entry,
            )
        results.append(result)
        for entry in result.history:
            history.append({**entry, "stage": name, "step": entry["step"] + offset})
        best = result.best
        stages.append(
            {
                "name": name,
                "steps": result.steps,
                "evaluations": len(result.history),
                "start_valid_logloss": result.history[0]["valid_logloss"],
                "start_valid_auc": result.history[0]["valid_auc"],
                "best_valid_logloss": best["valid_logloss"],
                "best_valid_auc": best["valid_auc"],
                "best_step": best["step"] + offset,
                "lr": {
                    "tower": stage.tower_lr,
                    "head": stage.head_lr,
                    "lm": 0.0 if frozen_lm_lr else stage.lm_lr,
                },
                "batch_size": stage_loop.batch_size,
                "wall_seconds": result.wall_seconds,
            }
        )
        start_entry = {"valid_logloss": best["valid_logloss"], "valid_auc": best["valid_auc"]}
        offset += result.steps
    model.tower.requires_grad_(True)
    model.fusion.requires_grad_(True)  # type: ignore[union-attr]
    last = results[-1]
    wall = sum(r.wall_seconds for r in results)
    rows = sum(r.train_rows_per_s * r.wall_seconds for r in results if r.steps)
    return FitResult(
        best_epoch=last.best_epoch,
        history=history,
        wall_seconds=wall,
        train_rows_per_s=rows / wall if rows and wall > 0 else float("nan"),
        best_step=last.best_step + offset - last.steps,
        steps=offset,
        checkpoint=last.checkpoint,
        eval_seconds=sum(r.eval_seconds for r in results),
        stages=stages,
        best_index=len(history) - len(last.history) + last.best_index,
    )


def stage_summary(stages: list[dict[str, Any]]) -> str:
    """`lm 0.07278 -> 0.07270 (120 steps); all ...` for one-line summaries."""
    return "; ".join(
        f"{s['name']} {s['start_valid_logloss']:.5f} -> {s['best_valid_logloss']:.5f} ({s['steps']} steps)"
        for s in stages
    )
