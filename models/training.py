"""Training drivers of `nlpctr train` on in-memory frames: E0/E1/E3's CTR model, E2's LM step
(whose fit and feature writing `models.streamed_training` shares).

`pipelines/train.py` reads the frames from Feast and publishes what is written here; this module
takes pandas frames and run folders. One loop (`models.trainer.fit`) trains everything; a model
with an LM goes through the joint recipe (`models.joint.fit_joint`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import nlpctr
from nlpctr.errors import UserError
from nlpctr.layout import LmFeatureMeta, pair_key_columns
from nlpctr.models import metrics
from nlpctr.models.config import encoder_config, joint_config, loop_config
from nlpctr.models.data import BatchSource, FeatureColumns, Tensors
from nlpctr.models.device import CPU, Placement
from nlpctr.models.encoder import TextEncoder
from nlpctr.models.joint import fit_joint
from nlpctr.models.lm_features import (
    has_query_text,
    lm_feature_root,
    lm_outputs,
    pairs_of,
    text_pairs,
    write_lm_features,
)
from nlpctr.models.runs import CHECKPOINTS, Preprocessing, TrainedRun, build_model, build_scorer
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import FitResult, TextScorer, fit, labels_of, predict

# Registers an LM-feature folder (its meta) with the feature store; returns the view's name.
Publish = Callable[[LmFeatureMeta], str]


@dataclass(frozen=True)
class FitInputs:
    """What a CTR fit reads besides its rows, in memory or streamed."""

    manifest: dict[str, Any]  # the data folder's (its group column)
    config: dict[str, Any]  # the merged train config
    fill_ctr: float  # the CTR that stands in for missing history
    fusion: str | None = None  # joint: how the trainable LM joins the tower
    progress: bool = True
    warm_start: TrainedRun | None = None  # joint: the E0 run its tower starts from
    placement: Placement = CPU  # where the models train and at what precision (models/device.py)


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
    pre = Preprocessing.fit(frame, columns, inputs.manifest["group"], inputs.fill_ctr)
    data = pre.tensorize(frame)
    texts = None
    if inputs.fusion:
        lm = TextEncoder(encoder_config(inputs.config), trainable=True, placement=inputs.placement)
        texts = TextBatcher.for_data(lm, data)
    model, result = fit_model(pre, data, texts, inputs, checkpoints)
    return pre, data, model, texts, result


def train_model(
    model: torch.nn.Module,
    data: BatchSource,
    config: dict[str, Any],
    checkpoints: Path,
    texts: TextBatcher | None,
    warm_started: bool,
    progress: bool,
) -> FitResult:
    """`models.trainer.fit`, or the joint recipe (`models.joint.fit_joint`) for a model with an LM."""
    loop = loop_config(config)
    if texts is None:
        return fit(model, data, loop, checkpoints, progress=progress)
    return fit_joint(model, data, loop, joint_config(config), checkpoints, texts, warm_started, progress)


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
        key = entry.get("stage")
        last[key] = max(last.get(key, 0), int(entry["epoch"]) + 1)
    return sum(last.values())


# ------------------------------------------------------------------------------- E2's LM step


@dataclass(frozen=True)
class LmStep:
    """E2 steps 1 and 2: the LM fine-tuned alone on clicks, every epoch's features written."""

    epochs: int
    best_epoch: int
    history: list[dict[str, Any]]
    wall_seconds: float
    test_auc_standalone: float
    feature_view: str  # the published view of the chosen epoch
    features: dict[str, str]  # epoch folder -> its parquet folder
    chosen: str  # the epoch folder the view serves (peak validation AUC)
    encoder_version: str

    def to_dict(self) -> dict[str, Any]:
        """The `lm` section of the run's results.json (field order kept)."""
        return dict(self.__dict__)


def fit_lm_alone(
    data: BatchSource, texts: TextBatcher, inputs: FitInputs, run_dir: Path
) -> tuple[TextScorer, FitResult]:
    """E2 step 1: the LM and its head fine-tuned on clicks alone (stopped at peak validation AUC),
    every epoch checkpointed under `run_dir/checkpoints/lm`; in memory or on a stream alike."""
    scorer = build_scorer(inputs.config, texts.dim, inputs.fill_ctr).to(inputs.placement.device)
    loop = loop_config(inputs.config, "lm_loop")
    result = fit(scorer, data, loop, run_dir / CHECKPOINTS / "lm", texts=texts, progress=inputs.progress)
    return scorer, result


def write_lm_epochs(
    scorer: TextScorer,
    texts: TextBatcher,
    result: FitResult,
    rows: pd.DataFrame,
    test_auc: float,
    config: dict[str, Any],
    run_dir: Path,
    data_dir: Path,
    slug: str,
    publish: Publish,
) -> LmStep:
    """E2 step 2: every epoch's score and pooled vector per text pair of `rows` (a frame with the
    pair columns: the training frame, or the unique pairs of its shards), the best epoch published."""
    encoder = encoder_config(config)
    pairs = text_pairs(rows)
    root = lm_feature_root(data_dir, slug)
    with_query = has_query_text(rows)
    checkpoints = run_dir / CHECKPOINTS / "lm"
    folders = []
    for entry in result.history:
        epoch = int(entry["epoch"])
        state = torch.load(checkpoints / f"epoch-{epoch}.pt", map_location=texts.lm.device, weights_only=True)
        scorer.load_state_dict(state["model"])
        texts.lm.load_state_dict(state["lm"])
        outputs = lm_outputs(texts, {"lm_score": scorer.head}, pairs_of(pairs))
        version = f"{slug}@epoch-{epoch}/{encoder.version}/nlpctr=={nlpctr.__version__}"
        write_lm_features(root / f"epoch-{epoch}", pairs, outputs, version, with_query)
        folders.append(f"epoch-{epoch}")
    chosen = f"epoch-{result.best_epoch}"
    meta = LmFeatureMeta(
        run=slug,
        kind="cascade_finetuned",
        chosen=chosen,
        epochs=tuple(folders),
        keys=tuple(pair_key_columns(with_query)),
        model_version=f"{slug}@{chosen}/{encoder.version}/nlpctr=={nlpctr.__version__}",
        valid_auc={f"epoch-{int(h['epoch'])}": h["valid_auc"] for h in result.history},
    )
    return LmStep(
        epochs=len(result.history),
        best_epoch=result.best_epoch,
        history=result.history,
        wall_seconds=result.wall_seconds,
        test_auc_standalone=test_auc,
        feature_view=publish(meta),
        features={f: str(root / f) for f in folders},
        chosen=chosen,
        encoder_version=encoder.version,
    )


def train_lm_alone(
    frame: pd.DataFrame, inputs: FitInputs, run_dir: Path, data_dir: Path, slug: str, publish: Publish
) -> LmStep:
    """E2 steps 1 and 2 on an in-memory frame (`models.streamed_training.train_lm_streaming`
    on shards): fit, standalone test AUC, every epoch's features written, the best published."""
    manifest = inputs.manifest
    columns = FeatureColumns.for_manifest(manifest)
    pre = Preprocessing.fit(frame, columns, manifest["group"], inputs.fill_ctr)
    data = pre.tensorize(frame)
    lm = TextEncoder(encoder_config(inputs.config), trainable=True, placement=inputs.placement)
    texts = TextBatcher.for_data(lm, data)
    scorer, result = fit_lm_alone(data, texts, inputs, run_dir)
    test = data.rows("test")
    test_auc = metrics.auc(labels_of(data, test), predict(scorer, data, test, texts))
    return write_lm_epochs(
        scorer, texts, result, frame, test_auc, inputs.config, run_dir, data_dir, slug, publish
    )


# ------------------------------------------------------------------------------- E3's LM output


def write_joint_features(
    model: torch.nn.Module,
    texts: TextBatcher,
    frame: pd.DataFrame,
    config: dict[str, Any],
    data_dir: Path,
    slug: str,
    best_epoch: int,
    publish: Publish,
) -> str:
    """The trained joint LM's supplementary output per text pair, published as the view `lm_<run>`."""
    fusion = model.fusion
    assert fusion is not None
    head = {"lm_score": fusion.score} if fusion.fusion == "score" else {"supplementary": fusion.project}
    pairs = text_pairs(frame)
    outputs = lm_outputs(texts, head, pairs_of(pairs))
    # The view serves the supplementary output alone: nothing reads a joint run's 384-d pooled
    # vector, and with it the view is 12x larger (the concat/gate output is 32-d), which is what
    # the online write of millions of pairs holds in memory at once.
    del outputs["lm_embedding"]
    encoder = encoder_config(config)
    chosen = f"epoch-{best_epoch}"
    version = f"{slug}@{chosen}/joint-{fusion.fusion}/{encoder.version}/nlpctr=={nlpctr.__version__}"
    with_query = has_query_text(frame)
    write_lm_features(lm_feature_root(data_dir, slug) / chosen, pairs, outputs, version, with_query)
    meta = LmFeatureMeta(
        run=slug,
        kind="joint",
        chosen=chosen,
        epochs=(chosen,),
        keys=tuple(pair_key_columns(with_query)),
        model_version=version,
        fusion=fusion.fusion,
    )
    return publish(meta)
