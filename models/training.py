"""Training drivers of `nlpctr train` on in-memory frames: E0/E1/E3's CTR model, E2's LM step
(whose fit and feature writing `models.streamed_training` shares).

`pipelines/train.py` reads the frames from Feast and publishes what is written here; this module
takes pandas frames and run folders. One loop (`models.trainer.fit`) trains everything; E2's and
E3's LMs go through one LM recipe (`models.recipe`), so the two arms share budget and optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import nlpctr
from nlpctr.atomic import JsonObject
from nlpctr.compat import as_manifest
from nlpctr.errors import UserError
from nlpctr.layout import LmFeatureMeta, Manifest, RunLayout, pair_key_columns
from nlpctr.models import metrics
from nlpctr.models.checkpoints import load_checkpoint
from nlpctr.models.config import TrainConfig
from nlpctr.models.ctr_net import Fusion, TextScorer
from nlpctr.models.data import BatchSource, FeatureColumns, Tensors
from nlpctr.models.device import CPU, Placement
from nlpctr.models.encoder import TextEncoder
from nlpctr.models.lm_features import (
    has_query_text,
    lm_feature_root,
    lm_outputs,
    pairs_of,
    text_pairs,
    write_lm_features,
)
from nlpctr.models.loop import Evaluation, StageRecord
from nlpctr.models.prediction import labels_of, predict
from nlpctr.models.recipe import LM, fit_recipe, plan
from nlpctr.models.runs import Preprocessing, TrainedRun, build_model, build_scorer
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import FitResult, fit, step_checkpoint

# Registers an LM-feature folder (its meta) with the feature store; returns the view's name.
Publish = Callable[[LmFeatureMeta], str]


@dataclass(frozen=True)
class FitInputs:
    """What a CTR fit reads besides its rows, in memory or streamed."""

    manifest: Manifest  # the data folder's (its group column)
    config: TrainConfig
    fill_ctr: float  # the CTR that stands in for missing history
    fusion: str | None = None  # joint: how the trainable LM joins the tower
    progress: bool = True
    warm_start: TrainedRun | None = None  # joint: the E0 run its tower starts from
    placement: Placement = CPU  # where the models train and at what precision (models/device.py)

    def __post_init__(self) -> None:
        object.__setattr__(self, "manifest", as_manifest(self.manifest))  # nlpctr/compat.py


def fit_model(
    pre: Preprocessing, data: BatchSource, texts: TextBatcher | None, inputs: FitInputs, checkpoints: Path
) -> tuple[torch.nn.Module, FitResult]:
    """The model for `pre` (with the fusion when `texts` has an LM), warm-started when asked, fitted."""
    model = build_model(pre, inputs.config, inputs.fusion, texts.dim if texts else 0)
    model.to(inputs.placement.device)
    if inputs.warm_start is not None:
        start_from(model, pre, inputs.warm_start)
    warm = inputs.warm_start is not None
    result = train_model(model, data, inputs.config, checkpoints, texts, warm, inputs.progress)
    return model, result


def fit_ctr(
    frame: pd.DataFrame, columns: FeatureColumns, inputs: FitInputs, checkpoints: Path
) -> tuple[Preprocessing, Tensors, torch.nn.Module, TextBatcher | None, FitResult]:
    """Tensors, model (with a trainable LM when there is a fusion) and the fitted loop."""
    pre = Preprocessing.fit(frame, columns, inputs.manifest.group, inputs.fill_ctr)
    data = pre.tensorize(frame)
    texts = None
    if inputs.fusion:
        lm = TextEncoder(inputs.config.encoder, trainable=True, placement=inputs.placement)
        texts = TextBatcher.for_data(lm, data)
    model, result = fit_model(pre, data, texts, inputs, checkpoints)
    return pre, data, model, texts, result


def train_model(
    model: torch.nn.Module,
    data: BatchSource,
    config: TrainConfig,
    checkpoints: Path,
    texts: TextBatcher | None,
    warm_started: bool,
    progress: bool,
) -> FitResult:
    """`models.trainer.fit`, or the LM recipe (`models.recipe`) for a model with an LM (E3)."""
    loop = config.loop
    if texts is None:
        return fit(model, data, loop, checkpoints, progress=progress)
    stages = plan(
        replace(config.lm_loop, early_stop="logloss"),
        config.recipe,
        warm_started=warm_started,
        has_tower=True,
        tower_lr=loop.lr,
    )
    return fit_recipe(model, data, stages, checkpoints, texts, progress)


def start_from(model: torch.nn.Module, pre: Preprocessing, baseline: TrainedRun) -> None:
    """Initialise a joint model's CTR tower from a trained E0 that read the same inputs."""
    if pre.to_json() != baseline.pre.to_json():
        raise UserError(
            f"--init-from {baseline.directory.name} was trained on other inputs (columns or vocabularies "
            "differ); train it on the same data and service"
        )
    model.warm_start(baseline.model)


def train_ctr(labels: metrics.Labels) -> float:
    """The training rows' CTR (what RIG is relative to)."""
    return float(labels.clicks.sum() / max(labels.impressions.sum(), 1))


def epochs_trained(result: FitResult) -> int:
    """Epochs a fit went through (summed over the joint recipe's stages)."""
    last: dict[Any, int] = {}
    for entry in result.history:
        last[entry.stage] = max(last.get(entry.stage, 0), int(entry.epoch) + 1)
    return sum(last.values())


# ------------------------------------------------------------------------------- E2's LM step


@dataclass(frozen=True)
class LmCheckpoint:
    """One evaluated state of E2's LM stage (`step-0` is the probe's head on the frozen LM)."""

    step: int  # optimizer steps of the LM stage before it
    valid_auc: float  # the LM's standalone validation AUC
    valid_logloss: float
    features: str  # the parquet folder of its LM feature


@dataclass(frozen=True)
class LmStep:
    """E2 steps 1 and 2: the LM fine-tuned alone on clicks, every checkpoint's features written."""

    checkpoints: dict[str, LmCheckpoint]  # `step-<k>` -> the checkpoint, in step order
    chosen: str  # the checkpoint the view serves: peak standalone validation AUC
    history: list[Evaluation]  # every evaluation of the recipe (probe and LM stage)
    stages: list[StageRecord]  # the recipe's stage records (budget: steps, rows, seconds)
    wall_seconds: float
    test_auc_standalone: float
    feature_view: str  # the published view of the chosen checkpoint
    encoder_version: str

    @property
    def valid_auc_rising_at_end(self) -> bool:
        """Whether the last checkpoint's validation AUC was above the one before (still rising)."""
        aucs = [c.valid_auc for c in self.checkpoints.values()]
        return len(aucs) > 1 and aucs[-1] > aucs[-2]

    def to_dict(self) -> JsonObject:
        """The `lm` section of the run's results.json."""
        return {
            "checkpoints": {name: dict(c.__dict__) for name, c in self.checkpoints.items()},
            "chosen": self.chosen,
            "valid_auc_rising_at_end": self.valid_auc_rising_at_end,
            "history": [entry.to_json() for entry in self.history],
            "stages": self.stages,
            "wall_seconds": self.wall_seconds,
            "test_auc_standalone": self.test_auc_standalone,
            "feature_view": self.feature_view,
            "encoder_version": self.encoder_version,
        }


def fit_lm_alone(
    data: BatchSource, texts: TextBatcher, inputs: FitInputs, run_dir: Path
) -> tuple[TextScorer, FitResult]:
    """E2 step 1: the LM and its click head on clicks alone, by the LM recipe E3 uses (probe,
    then the LM stage on `lm_loop`'s budget), every LM-stage evaluation checkpointed under
    `run_dir/checkpoints/lm/stage1` and the peak-validation-AUC one kept; in memory or streamed."""
    scorer = build_scorer(inputs.config, texts.dim, inputs.fill_ctr).to(inputs.placement.device)
    recipe = inputs.config.recipe
    if not recipe.lm_stage:
        raise UserError("cascade-finetuned fine-tunes its LM: recipe.lm_stage must be true")
    lm_loop = replace(inputs.config.lm_loop, early_stop="auc", keep_checkpoints=True)
    stages = plan(lm_loop, recipe, warm_started=True, has_tower=False, tower_lr=0.0)
    result = fit_recipe(scorer, data, stages, RunLayout(run_dir).checkpoints("lm"), texts, inputs.progress)
    return scorer, result


def lm_stage_entries(result: FitResult) -> list[tuple[str, Evaluation]]:
    """(`step-<k>`, evaluation) of each evaluation of the LM stage, k counted within the stage."""
    entries = [h for h in result.history if h.stage == LM]
    offset = entries[0].step if entries else 0
    return [(f"step-{h.step - offset}", h) for h in entries]


def write_lm_checkpoints(
    scorer: TextScorer,
    texts: TextBatcher,
    result: FitResult,
    rows: pd.DataFrame,
    test_auc: float,
    config: TrainConfig,
    run_dir: Path,
    data_dir: Path,
    slug: str,
    publish: Publish,
) -> LmStep:
    """E2 step 2: every LM-stage checkpoint's score and pooled vector per text pair of `rows` (a
    frame with the pair columns: the training frame, or the unique pairs of its shards); the peak
    validation AUC one published. The scorer and LM end with the chosen checkpoint's weights."""
    encoder = config.encoder
    pairs = text_pairs(rows)
    root = lm_feature_root(data_dir, slug)
    with_query = has_query_text(rows)
    stage_dir = RunLayout(run_dir).checkpoints("lm") / "stage1"
    entries = lm_stage_entries(result)
    chosen = max(entries, key=lambda item: item[1].valid_auc)[0]  # ties: the earliest
    checkpoints = {}
    for name, entry in [*(e for e in entries if e[0] != chosen), *(e for e in entries if e[0] == chosen)]:
        step = int(name.removeprefix("step-"))
        state = load_checkpoint(stage_dir / step_checkpoint(step), texts.lm.device)
        scorer.load_state_dict(state["model"])
        texts.lm.load_state_dict(state["lm"])
        outputs = lm_outputs(texts, {"lm_score": scorer.head}, pairs_of(pairs))
        version = f"{slug}@{name}/{encoder.version}/nlpctr=={nlpctr.__version__}"
        write_lm_features(root / name, pairs, outputs, version, with_query)
        checkpoints[name] = LmCheckpoint(step, entry.valid_auc, entry.valid_logloss, str(root / name))
    ordered = dict(sorted(checkpoints.items(), key=lambda item: item[1].step))
    meta = LmFeatureMeta(
        run=slug,
        kind="cascade_finetuned",
        chosen=chosen,
        checkpoints=tuple(ordered),
        keys=tuple(pair_key_columns(with_query)),
        model_version=f"{slug}@{chosen}/{encoder.version}/nlpctr=={nlpctr.__version__}",
        valid_auc={name: c.valid_auc for name, c in ordered.items()},
    )
    return LmStep(
        checkpoints=ordered,
        chosen=chosen,
        history=result.history,
        stages=result.stages,
        wall_seconds=result.wall_seconds,
        test_auc_standalone=test_auc,
        feature_view=publish(meta),
        encoder_version=encoder.version,
    )


def train_lm_alone(
    frame: pd.DataFrame, inputs: FitInputs, run_dir: Path, data_dir: Path, slug: str, publish: Publish
) -> LmStep:
    """E2 steps 1 and 2 on an in-memory frame (`models.streamed_training.train_lm_streaming`
    on shards): fit, standalone test AUC, every checkpoint's features written, the best published."""
    manifest = inputs.manifest
    columns = FeatureColumns.for_manifest(manifest)
    pre = Preprocessing.fit(frame, columns, manifest.group, inputs.fill_ctr)
    data = pre.tensorize(frame)
    lm = TextEncoder(inputs.config.encoder, trainable=True, placement=inputs.placement)
    texts = TextBatcher.for_data(lm, data)
    scorer, result = fit_lm_alone(data, texts, inputs, run_dir)
    test = data.rows("test")
    test_auc = metrics.auc(labels_of(data, test), predict(scorer, data, test, texts))
    return write_lm_checkpoints(
        scorer, texts, result, frame, test_auc, inputs.config, run_dir, data_dir, slug, publish
    )


# ------------------------------------------------------------------------------- E3's LM output


def write_joint_features(
    model: torch.nn.Module,
    texts: TextBatcher,
    frame: pd.DataFrame,
    config: TrainConfig,
    data_dir: Path,
    slug: str,
    best_step: int,
    publish: Publish,
) -> str:
    """The trained joint LM's pooled vector and supplementary output (the score fusion's logit,
    or concat's and gate's projection) per text pair, published as the view `lm_<run>`."""
    fusion = model.fusion
    assert fusion is not None
    head = {"lm_score": fusion.score} if fusion.fusion == Fusion.SCORE else {"supplementary": fusion.project}
    pairs = text_pairs(frame)
    outputs = lm_outputs(texts, head, pairs_of(pairs))
    encoder = config.encoder
    chosen = f"step-{best_step}"
    version = f"{slug}@{chosen}/joint-{fusion.fusion}/{encoder.version}/nlpctr=={nlpctr.__version__}"
    with_query = has_query_text(frame)
    write_lm_features(lm_feature_root(data_dir, slug) / chosen, pairs, outputs, version, with_query)
    meta = LmFeatureMeta(
        run=slug,
        kind="joint",
        chosen=chosen,
        checkpoints=(chosen,),
        keys=tuple(pair_key_columns(with_query)),
        model_version=version,
        fusion=fusion.fusion,
    )
    return publish(meta)
