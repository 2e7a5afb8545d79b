"""How each mode of `nlpctr train` trains (`pipelines/train.py` checks the request, claims the
run folder and writes run.json and results.json around it).

`TRAIN_MODE` maps a mode to its function: E0 `baseline`, E1 `cascade-frozen`, E2
`cascade-finetuned` (the LM fine-tuned alone, its feature published, then E0 + it) and E3
`joint`. Each trains on its Feast service's training frame, in memory or streamed from parquet
shards (`RunSetup.streamed`), tests the model and writes the run's predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from nlpctr.atomic import JsonObject, atomic_path
from nlpctr.errors import UserError
from nlpctr.features import store as feature_store
from nlpctr.features.job_outputs import JobOutputs
from nlpctr.features.names import BASELINE, CASCADE_FROZEN, lm_view_name
from nlpctr.layout import LmFeatureMeta, Manifest, RunLayout, lm_features_dir
from nlpctr.models import streaming
from nlpctr.models.config import Mode, TrainConfig
from nlpctr.models.data import FeatureColumns
from nlpctr.models.device import Placement
from nlpctr.models.encoder_source import resolve_encoder
from nlpctr.models.evaluation import metric_report
from nlpctr.models.prediction import labels_of, predict
from nlpctr.models.recipe import StageBudget, budget
from nlpctr.models.runs import Preprocessing, TrainedRun
from nlpctr.models.streamed_training import train_lm_streaming, train_streaming
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import FitResult
from nlpctr.models.training import (
    FitInputs,
    LmStep,
    fit_ctr,
    train_ctr,
    train_lm_alone,
    write_joint_features,
)

if TYPE_CHECKING:  # the request is built and checked in pipelines/train.py, which imports this module
    from nlpctr.pipelines.train import TrainRequest


@dataclass(frozen=True)
class RunSetup:
    """A checked request with everything its mode's training reads."""

    request: TrainRequest
    data_dir: Path
    manifest: Manifest
    config: TrainConfig
    identity: JsonObject  # config.json: what makes two runs of a name the same run
    run_dir: Path
    slug: str  # the run name as a Feast identifier
    fill_ctr: float
    streamed: bool
    warm_start: TrainedRun | None
    placement: Placement

    @property
    def fit_inputs(self) -> FitInputs:
        request = self.request
        return FitInputs(
            self.manifest,
            self.config,
            self.fill_ctr,
            request.fusion,
            request.progress,
            self.warm_start,
            self.placement,
        )


@dataclass
class TrainedModel:
    """What a mode's training hands back: the model, its test report, and where it came from."""

    service: str
    pre: Preprocessing
    model: torch.nn.Module
    texts: TextBatcher | None
    fit: FitResult
    report: dict[str, Any]  # test metrics
    train_ctr: float
    encoder_version: str | None
    text_rows: pd.DataFrame  # rows (their text pairs) a joint run writes its LM feature for
    lm_step: LmStep | None = None
    supplementary_view: str | None = None  # joint: the view of its LM's output


def frozen_encoder_version(data_dir: Path, columns: Iterable[str]) -> str | None:
    """The encoder behind a frame's frozen text vectors (`nlpctr experiment` records it too).

    Args:
        data_dir: a prepared dataset folder.
        columns: the frame's columns; its `ad_text_<slug>__embedding` ones name the embedding folder.

    Returns:
        That folder's encoder version, or None when the columns name no embedding folder.
    """
    slugs = {c[len("ad_text_") : -len("__embedding")] for c in columns if c.startswith("ad_text_")}
    versions = [e.encoder_version for e in JobOutputs.discover(data_dir).embeddings if e.slug in slugs]
    return versions[0] if versions else None


def publisher(data_dir: Path) -> Callable[[LmFeatureMeta], str]:
    """Publishing an LM-feature folder: name the chosen epoch, register the view, materialise it."""

    def publish(meta: LmFeatureMeta) -> str:
        meta.write(lm_features_dir(data_dir, meta.run))
        feature_store.reapply(data_dir)
        view = lm_view_name(meta.run)
        feature_store.materialize(data_dir, views=[view])
        return view

    return publish


# ------------------------------------------------------------------------------- the two ways to train


def in_memory(
    setup: RunSetup, service: str, frame: pd.DataFrame, columns: FeatureColumns, encoder_version: str | None
) -> TrainedModel:
    """Train on the service's whole training frame; test it and write the test predictions."""
    pre, data, model, texts, result = fit_ctr(
        frame, columns, setup.fit_inputs, RunLayout(setup.run_dir).checkpoints("ctr")
    )
    test, valid = data.rows("test"), data.rows("valid")
    p_test = predict(model, data, test, texts)
    ctr_train = train_ctr(labels_of(data, data.rows("train")))
    report = metric_report(labels_of(data, test), p_test, ctr_train, setup.config.evaluation)
    # validation predictions too: controls are compared on validation, the test split only judges
    frames = [
        pd.DataFrame({"impression_id": data.impression_id[rows.numpy()], "split": split, "p": p})
        for split, rows, p in (("test", test, p_test), ("valid", valid, predict(model, data, valid, texts)))
    ]
    with atomic_path(RunLayout(setup.run_dir).predictions) as staged:
        pd.concat(frames, ignore_index=True).to_parquet(staged, index=False)
    return TrainedModel(service, pre, model, texts, result, report, ctr_train, encoder_version, frame)


def streamed(
    setup: RunSetup, service: str, root: Path, columns: FeatureColumns, encoder_version: str | None
) -> TrainedModel:
    """Train and test on the service's training frame written as parquet shards under `root`."""
    pre, model, texts, result, report, ctr_train = train_streaming(
        root, columns, setup.fit_inputs, setup.run_dir
    )
    # Only a joint run reads text pairs (for its LM feature); the rest never load the frame.
    pairs = streaming.unique_text_pairs(root) if setup.request.mode == Mode.JOINT else pd.DataFrame()
    return TrainedModel(service, pre, model, texts, result, report, ctr_train, encoder_version, pairs)


def train_service(
    setup: RunSetup, service: str, columns: FeatureColumns, encoder_version: str | None
) -> TrainedModel:
    """Train on a service's training frame: streamed from shards, or loaded in memory."""
    if setup.streamed:
        root = feature_store.write_training_shards(setup.data_dir, service)
        return streamed(setup, service, root, columns, encoder_version)
    frame = feature_store.training_frame(setup.data_dir, service)
    return in_memory(setup, service, frame, columns, encoder_version)


# ------------------------------------------------------------------------------- one function per mode


def train_baseline(setup: RunSetup) -> TrainedModel:
    """E0: IDs, context and CTR history."""
    return train_service(setup, BASELINE, FeatureColumns.for_manifest(setup.manifest), None)


def frozen_service(data_dir: Path, encoder: str | None) -> str:
    """E1's service: `cascade_frozen` (the default encoder `features apply` chose), or with
    `--encoder`, `cascade_frozen_<slug>` of the one embedding folder that encoder wrote."""
    if encoder is None:
        return CASCADE_FROZEN
    identity = resolve_encoder(encoder).identity
    slugs = [
        e.slug
        for e in JobOutputs.discover(data_dir).embeddings
        if e.encoder_version.startswith(f"{identity}/")
    ]
    if len(slugs) == 1:
        return f"{CASCADE_FROZEN}_{slugs[0]}"
    if not slugs:
        raise UserError(
            f"{data_dir} has no embeddings of --encoder {encoder} ({identity}); run `nlpctr embed "
            f"--data {data_dir} --encoder {encoder}`, then `nlpctr features apply` and `materialize`"
        )
    raise UserError(
        f"{data_dir} has {len(slugs)} embedding folders of --encoder {encoder} ({', '.join(slugs)}); "
        f"choose one with `nlpctr features apply --data {data_dir} --encoder SLUG` and train without "
        "--encoder"
    )


def train_cascade_frozen(setup: RunSetup) -> TrainedModel:
    """E1: E0's inputs and the frozen encoder's text vectors (the service's `__embedding` columns)."""
    service = frozen_service(setup.data_dir, setup.request.encoder)
    if setup.streamed:
        root = feature_store.write_training_shards(setup.data_dir, service)
        names = streaming.shard_columns(root)
    else:
        frame = feature_store.training_frame(setup.data_dir, service)
        names = list(frame.columns)
    cascade = [c for c in names if c.endswith("__embedding")]
    columns = FeatureColumns.for_manifest(setup.manifest, cascade=cascade)
    version = frozen_encoder_version(setup.data_dir, names)
    if setup.streamed:
        return streamed(setup, service, root, columns, version)
    return in_memory(setup, service, frame, columns, version)


def train_cascade_finetuned(setup: RunSetup) -> TrainedModel:
    """E2: the LM fine-tuned alone on clicks (on E0's frame), its chosen epoch's feature
    published, then E0 + it."""
    lm_args = (setup.fit_inputs, setup.run_dir, setup.data_dir, setup.slug, publisher(setup.data_dir))
    if setup.streamed:
        lm_step = train_lm_streaming(feature_store.write_training_shards(setup.data_dir, BASELINE), *lm_args)
    else:
        lm_step = train_lm_alone(feature_store.training_frame(setup.data_dir, BASELINE), *lm_args)
    view = lm_view_name(setup.slug)
    if setup.config.cascade_form == "vector":
        columns = FeatureColumns.for_manifest(setup.manifest, cascade=[f"{view}__lm_embedding"])
    else:
        columns = FeatureColumns.for_manifest(setup.manifest, scores=[f"{view}__lm_score"])
    trained = train_service(setup, f"cascade_finetuned_{setup.slug}", columns, lm_step.encoder_version)
    trained.lm_step = lm_step
    return trained


def train_joint(setup: RunSetup) -> TrainedModel:
    """E3: the LM and E0 trained end to end through a fusion; its LM's output published as a view."""
    version = setup.config.encoder.version
    trained = train_service(setup, BASELINE, FeatureColumns.for_manifest(setup.manifest), version)
    assert trained.texts is not None
    trained.supplementary_view = write_joint_features(
        trained.model,
        trained.texts,
        trained.text_rows,
        setup.config,
        setup.data_dir,
        setup.slug,
        trained.fit.best_step,
        publisher(setup.data_dir),
    )
    return trained


def lm_budget(trained: TrainedModel, result: FitResult) -> dict[str, StageBudget] | None:
    """The LM recipe's budget per stage: E2's LM step's, or the joint run's own."""
    if trained.lm_step is not None:
        return budget(trained.lm_step.stages)
    return budget(result.stages) if result.stages else None


TRAIN_MODE: dict[Mode, Callable[[RunSetup], TrainedModel]] = {
    Mode.BASELINE: train_baseline,
    Mode.CASCADE_FROZEN: train_cascade_frozen,
    Mode.CASCADE_FINETUNED: train_cascade_finetuned,
    Mode.JOINT: train_joint,
}
