"""E4 distillation: k-layer students of a joint (E3) teacher, trained three ways.

SuKD (click loss + λ · MSE to the teacher's supplementary output, E0's tower frozen), No-KD
(λ = 0) and feature-KD (the teacher's pooled vector from text alone). Students start from the
teacher's first k layers; SuKD and No-KD run in `models.trainer.fit`. Driven by
`pipelines/experiment/students.py`. Pure PyTorch. The three ways and the conversion rate:
docs/DESIGN.md, "The experiment protocol" and "Modules in detail", distill.py.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from nlpctr.atomic import write_atomic
from nlpctr.config_files import is_integer
from nlpctr.errors import UserError
from nlpctr.models import metrics
from nlpctr.models.checkpoints import load_checkpoint, save_checkpoint
from nlpctr.models.ctr_net import CtrModel, Fusion
from nlpctr.models.data import Tensors
from nlpctr.models.device import seed_run
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.loop import Optimization
from nlpctr.models.text_batches import TextBatcher, has_query
from nlpctr.models.trainer import FitResult, LoopConfig, fit

FEATURE_KD_WEIGHTS = "student.pt"
FEATURE_KD_HISTORY = "history.json"


def student_encoder(teacher: TextEncoder, layers: int) -> TextEncoder:
    """A trainable k-layer encoder with the teacher's embeddings, first k layers, pooling and length."""
    teacher_layers = teacher.config.layers
    if not is_integer(layers) or not 1 <= layers <= teacher_layers:
        raise UserError(
            f"student layers must be an integer in 1..{teacher_layers} (the teacher's), got {layers!r}"
        )
    config = EncoderConfig(
        layers=layers,
        pooling=teacher.config.pooling,
        max_length=teacher.config.max_length,
        pair_reading=teacher.config.pair_reading,
        name=teacher.config.name,
    )
    student = TextEncoder(config, trainable=True, placement=teacher.placement)
    dropped = tuple(f"model.encoder.layer.{i}." for i in range(layers, teacher_layers))
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith(dropped)}
    student.load_state_dict(state)  # strict: every student parameter comes from the teacher
    return student


def pooled_vectors(lm: TextEncoder, data: Tensors, index: torch.Tensor | None = None) -> torch.Tensor:
    """The LM's pooled vector of each unique text of `data` (or of the texts `index` names),
    (n, dim), in inference mode; row i is `data.texts[i]`, as `data.text_index` counts."""
    lm.eval()
    pairs = data.texts if index is None else [data.texts[i] for i in index.tolist()]
    return TextBatcher(lm, has_query(data.texts)).encode_pairs(pairs)


def supplementary_outputs(
    model: CtrModel, lm: TextEncoder, data: Tensors, index: torch.Tensor | None = None
) -> torch.Tensor:
    """What SuKD matches, per unique text (as `pooled_vectors` orders them): the fusion's
    logit (n,) for `score`, the LM's pooled vector (n, dim) for `concat` and `gate`."""
    fusion = model.fusion
    if fusion is None:
        raise UserError("the teacher has no text fusion: distil from a joint (E3) run")
    vectors = pooled_vectors(lm, data, index)
    if fusion.fusion != Fusion.SCORE:
        return vectors
    fusion.eval()
    with torch.inference_mode():
        return fusion.score(vectors).squeeze(-1)


def distance(model: CtrModel, lm: TextEncoder, data: Tensors, targets: torch.Tensor, split: str) -> float:
    """MSE between a model's supplementary outputs and `targets` over the unique texts of a split."""
    index = torch.unique(data.text_index[data.rows(split)])
    return float(nn.functional.mse_loss(supplementary_outputs(model, lm, data, index), targets[index]))


@dataclass
class JointStudent:
    model: CtrModel  # a copy of the teacher's CtrModel: frozen E0 tower, trained fusion head
    lm: TextEncoder  # the k-layer student LM
    result: FitResult


def fit_joint_student(
    teacher_model: CtrModel,
    teacher_lm: TextEncoder,
    data: Tensors,
    layers: int,
    distill_weight: float,
    config: LoopConfig,
    checkpoint_dir: Path,
    targets: torch.Tensor | None = None,
    progress: bool = True,
) -> JointStudent:
    """SuKD (distill_weight λ > 0) or No-KD (λ = 0): a k-layer student trained in the joint model.

    The student model is a copy of the teacher's (same fusion head as init) with its E0 tower
    frozen; the student LM and the fusion head train on click loss + λ · MSE to the teacher's
    supplementary output of each row's text (`targets`, from `supplementary_outputs` on the same
    `data`, computed here when not given), the MSE averaged over the batch's rows (and vector
    dimensions). Checkpoints are fit's: `{"model", "lm"}` state dicts per epoch.

    Args:
        teacher_model: the trained joint (E3) `CtrModel`, with its fusion.
        teacher_lm: the teacher's LM.
        data: the rows to train and validate on.
        layers: the student's depth k, 1 to the teacher's layers.
        distill_weight: λ; 0 for No-KD.
        config: fit's loop settings.
        checkpoint_dir: fit's checkpoint folder.
        targets: the teacher's supplementary outputs per text of `data`; computed when None.
        progress: show progress bars.

    Returns:
        A `JointStudent`: the student model (best weights), its LM and fit's result.

    Raises:
        UserError: λ < 0, a teacher without a text fusion, or `layers` out of range.
    """
    if distill_weight < 0:
        raise UserError(f"distillation weight must be >= 0, got {distill_weight}")
    if teacher_model.fusion is None:
        raise UserError("the teacher has no text fusion: distil from a joint (E3) run")
    lm = student_encoder(teacher_lm, layers)
    model = copy.deepcopy(teacher_model)
    model.tower.requires_grad_(False)  # the E0 tower is fixed from the teacher
    auxiliary = None
    if distill_weight > 0:
        teacher = targets if targets is not None else supplementary_outputs(teacher_model, teacher_lm, data)
        fusion = model.fusion
        assert fusion is not None

        def distill_loss(text_index: torch.Tensor, text_vector: torch.Tensor) -> torch.Tensor:
            output = fusion.score(text_vector).squeeze(-1) if fusion.fusion == Fusion.SCORE else text_vector
            return distill_weight * nn.functional.mse_loss(output, teacher[text_index])

        auxiliary = distill_loss
    texts = TextBatcher.for_data(lm, data)
    result = fit(
        model, data, config, checkpoint_dir, texts=texts, progress=progress, auxiliary_loss=auxiliary
    )
    return JointStudent(model, lm, result)


@dataclass
class FeatureStudent:
    lm: TextEncoder  # the k-layer student, best epoch's weights
    best_epoch: int
    history: list[dict[str, float]]  # per epoch: train and valid MSE to the teacher's pooled vectors
    wall_seconds: float


def _text_mse(texts: TextBatcher, targets: torch.Tensor, index: torch.Tensor, batch_size: int) -> float:
    texts.lm.eval()
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(index), batch_size):
            batch = index[start : start + batch_size]
            total += float(nn.functional.mse_loss(texts.vectors(batch), targets[batch], reduction="sum"))
    return total / (len(index) * targets.shape[1])


def _feature_kd_epoch(
    texts: TextBatcher, targets: torch.Tensor, batches: Iterator[torch.Tensor], optimization: Optimization
) -> float:
    """One epoch of feature-KD steps; the running (EMA) training MSE, NaN when no step ran."""
    running = None
    for batch in batches:
        loss = nn.functional.mse_loss(texts.vectors(batch), targets[batch])
        optimization.step(loss)
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
    return float(running if running is not None else float("nan"))


def fit_feature_kd(
    teacher_lm: TextEncoder,
    data: Tensors,
    layers: int,
    config: LoopConfig,
    checkpoint_dir: Path,
    targets: torch.Tensor | None = None,
    progress: bool = True,
) -> FeatureStudent:
    """Feature-KD: a k-layer student learns the teacher LM's pooled vector (MSE) over unique texts,
    with no click (so not `fit`), keeping its best epoch on the valid texts.

    Args:
        teacher_lm: the teacher's LM, whose pooled vectors the student learns.
        data: the rows whose texts train (train split) and validate (valid split).
        layers: the student's depth k, 1 to the teacher's layers.
        config: batch, `lm_lr`, schedule, patience and seed (`lr`, `early_stop` do not apply).
        checkpoint_dir: where `student.pt` (weights_only-loadable) and its history go.
        targets: the teacher's pooled vector per text of `data`; computed when None.
        progress: show progress bars and one line per epoch.

    Returns:
        A `FeatureStudent`: the student at its best epoch, that epoch, the history, the wall time.
    Raises:
        UserError: `layers` out of range, or no texts in the train or the valid split.
    """
    targets = targets if targets is not None else pooled_vectors(teacher_lm, data)
    lm = student_encoder(teacher_lm, layers)
    texts = TextBatcher.for_data(lm, data)
    train = torch.unique(data.text_index[data.rows("train")])
    valid = torch.unique(data.text_index[data.rows("valid")])
    if len(train) == 0 or len(valid) == 0:
        raise UserError("feature-KD needs texts in both the train and the valid split")
    seed_run(config.seed)  # dropout
    generator = torch.Generator().manual_seed(config.seed)
    n_batches = math.ceil(len(train) / config.batch_size)
    if config.max_batches_per_epoch:
        n_batches = min(n_batches, config.max_batches_per_epoch)
    optimization = Optimization.adamw(  # the same schedule as `fit`'s (warmup, then decay)
        [{"params": list(lm.parameters()), "lr": config.lm_lr}],
        weight_decay=config.weight_decay,
        fused=config.fused_optimizer,
        schedule=(config.warmup_steps, config.decay, n_batches * config.epochs),
        scaler=lm.placement.grad_scaler(),  # fp16 only
    )

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    weights = checkpoint_dir / FEATURE_KD_WEIGHTS
    history: list[dict[str, float]] = []
    best_epoch, stale, started = -1, 0, time.perf_counter()
    for epoch in range(config.epochs):
        if stale >= config.patience:
            break
        lm.train()
        order = train[torch.randperm(len(train), generator=generator)]
        bar = tqdm(range(n_batches), desc=f"feature-KD epoch {epoch + 1}", disable=not progress, leave=False)
        batches = (order[step * config.batch_size : (step + 1) * config.batch_size] for step in bar)
        entry = {
            "epoch": epoch,
            "train_mse": _feature_kd_epoch(texts, targets, batches, optimization),
            "valid_mse": _text_mse(texts, targets, valid, config.batch_size),
        }
        history.append(entry)
        if progress:
            tqdm.write(
                f"feature-KD epoch {epoch + 1}: train MSE {entry['train_mse']:.5f}, "
                f"valid MSE {entry['valid_mse']:.5f}"
            )
        if best_epoch < 0 or entry["valid_mse"] < history[best_epoch]["valid_mse"]:
            best_epoch, stale = epoch, 0
            save_checkpoint(lm.state_dict(), weights)  # whole or not at all
        else:
            stale += 1
    write_atomic(
        checkpoint_dir / FEATURE_KD_HISTORY,
        json.dumps({"best_epoch": best_epoch, "history": history}, indent=2),
    )
    lm.load_state_dict(load_checkpoint(weights, lm.device))
    lm.eval()
    return FeatureStudent(lm, best_epoch, history, time.perf_counter() - started)


NOTHING_TO_DISTIL = "nothing to distil: the teacher feature's gain over E0 has a CI that includes 0"


def conversion(
    labels: metrics.Labels,
    student: np.ndarray,
    teacher: np.ndarray,
    baseline: np.ndarray,
    train_ctr: float,
    rounds: int,
    seed: int,
) -> dict[str, metrics.Estimate]:
    """(student − E0) / (teacher − E0) on AUC and RIG, each `{estimate, ci}`, where the three are
    test predictions of E0 + the student feature, E0 + the teacher feature and E0 itself. The CI
    draws the same groups for numerator and denominator (a paired group bootstrap).

    Args:
        labels: the test rows' labels and groups.
        student: test predictions of E0 + the student feature.
        teacher: test predictions of E0 + the teacher feature.
        baseline: E0's test predictions.
        train_ctr: the training CTR (RIG's entropy).
        rounds: bootstrap rounds.
        seed: the bootstrap's seed (the run's draws).

    Returns:
        `{"auc": {estimate, ci}, "rig": {estimate, ci}}`.
    """
    draws = metrics.Draws.of(labels.groups, rounds, seed)
    s, t, e0 = (metrics.resample(labels, p, draws) for p in (student, teacher, baseline))
    out: dict[str, metrics.Estimate] = {}
    for metric in ("auc", "rig"):
        (sv, sd), (tv, td), (bv, bd) = (r.value(metric, train_ctr) for r in (s, t, e0))
        out[metric] = draws.interval(float(metrics.ratio(sv - bv, tv - bv)), metrics.ratio(sd - bd, td - bd))
    return out


def inference_rows_per_s(encoder: TextEncoder, texts: Sequence[str], batch_size: int = 64) -> float:
    """Encoder-only throughput (texts per second) of `encoder.encode` on these texts, after one
    warm-up batch, every layer run (no cached frozen prefix); measure teacher and student on the
    same texts, one after the other."""
    if not texts:
        raise UserError("inference throughput needs at least one text")
    encoder.eval()
    with encoder.without_cache():  # a teacher's cached frozen layers would hide their cost
        encoder.encode(list(texts[:batch_size]), batch_size=batch_size)
        started = time.perf_counter()
        encoder.encode(list(texts), batch_size=batch_size)
        return len(texts) / (time.perf_counter() - started)
