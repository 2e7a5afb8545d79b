"""E4 distillation: students start from the teacher, SuKD pulls toward it, the tower stays fixed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nlpctr.errors import UserError
from nlpctr.models import metrics
from nlpctr.models.ctr_net import CtrModel, InputShape, NetConfig
from nlpctr.models.data import FeatureColumns, Tensors, tensorize
from nlpctr.models.distill import (
    FEATURE_KD_WEIGHTS,
    conversion,
    distance,
    fit_feature_kd,
    fit_joint_student,
    inference_rows_per_s,
    pooled_vectors,
    student_encoder,
    supplementary_outputs,
)
from nlpctr.models.encoder import EncoderConfig, TextEncoder, pool
from nlpctr.models.text_batches import pair_text
from nlpctr.models.trainer import LoopConfig

COLUMNS = FeatureColumns(categorical=("ad_id", "position"), ctr=("ad_id_ctr",), counts=("ad_id_impressions",))
WORDS_GOOD = ["free", "best", "new", "sale", "official"]
WORDS_BAD = ["old", "broken", "spam", "slow", "used"]
LOOP = LoopConfig(epochs=1, batch_size=32, lr=1e-4, lm_lr=1e-4, max_batches_per_epoch=4)


def synthetic_data(n: int = 400, seed: int = 0) -> Tensors:
    """Clicks depend on position and on a word of the ad text that the ids do not know."""
    rng = np.random.default_rng(seed)
    position = rng.integers(1, 6, size=n)
    good = rng.random(n) < 0.5
    word = np.where(good, rng.choice(WORDS_GOOD, n), rng.choice(WORDS_BAD, n))
    logit = -0.5 - 0.3 * position + 1.5 * good
    frame = pd.DataFrame(
        {
            "impression_id": [f"{i:06d}" for i in range(n)],
            "ad_id": [f"ad{i % 20}" for i in range(n)],
            "position": position.astype(str),
            "ad_id_ctr": 0.1,
            "ad_id_impressions": 50,
            "ad_text": [f"{w} running shoes model {i % 30}" for i, w in enumerate(word)],
            "impressions": 1,
            "clicks": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64),
            "split": np.where(rng.random(n) < 0.7, "train", np.where(rng.random(n) < 0.5, "valid", "test")),
        }
    )
    return tensorize(frame, COLUMNS, group="ad_id")[0]


def joint_model(data: Tensors, fusion: str, text_dim: int) -> CtrModel:
    torch.manual_seed(0)
    return CtrModel(
        InputShape(data.vocab_sizes, data.dense.shape[1]),
        NetConfig(hidden=(32,)),
        fusion=fusion,
        text_dim=text_dim,
    )


@pytest.fixture(scope="module")
def data() -> Tensors:
    return synthetic_data()


@pytest.fixture(scope="module")
def teacher(data: Tensors) -> tuple[CtrModel, TextEncoder]:
    """A 2-layer joint teacher with score fusion; untrained, which is enough to tell SuKD from No-KD."""
    lm = TextEncoder(EncoderConfig(layers=2, max_length=16))
    return joint_model(data, "score", lm.dim).eval(), lm


@pytest.fixture(scope="module")
def score_students(data, teacher, tmp_path_factory):
    """SuKD and No-KD students of the score teacher, from the same init, and the teacher's targets."""
    model, lm = teacher
    targets = supplementary_outputs(model, lm, data)
    root = tmp_path_factory.mktemp("students")
    runs = {
        name: fit_joint_student(model, lm, data, 1, weight, LOOP, root / name, targets, progress=False)
        for name, weight in (("sukd", 100.0), ("nokd", 0.0))
    }
    return runs, targets, root


def test_student_encoder_is_the_teachers_first_layers(teacher) -> None:
    _, lm = teacher
    student = student_encoder(lm, 1)
    assert student.config == EncoderConfig(
        layers=1, pooling=lm.config.pooling, max_length=lm.config.max_length
    )
    assert len(student.model.encoder.layer) == 1
    # Every parameter trains but BERT's pooler, which `pool` never uses.
    trains = {name: p.requires_grad for name, p in student.named_parameters()}
    assert all(v for name, v in trains.items() if ".pooler." not in name) and student.training
    teacher_params = dict(lm.named_parameters())
    for name, parameter in student.named_parameters():
        torch.testing.assert_close(parameter, teacher_params[name], rtol=0, atol=0)
    batch = lm.tokenize(["free running shoes", "a much longer broken ad text about old shoes"])
    with torch.no_grad():
        hidden = lm.model(**batch, output_hidden_states=True).hidden_states[1]  # after the teacher's layer 1
        torch.testing.assert_close(
            student.eval()(**batch),
            pool(hidden, batch["attention_mask"], lm.config.pooling),
            rtol=0,
            atol=1e-6,
        )
    with pytest.raises(UserError, match=r"1\.\.2"):
        student_encoder(lm, 3)


def test_sukd_keeps_the_students_logit_near_the_teachers(data, score_students) -> None:
    # From the same init the click loss alone (No-KD) moves the student's text logit away from
    # the (untrained, miscalibrated) teacher's; the SuKD term holds it close.
    runs, targets, _ = score_students
    after = {name: distance(run.model, run.lm, data, targets, "valid") for name, run in runs.items()}
    assert targets.shape == (len(data.texts),) and targets.std() > 0
    assert after["sukd"] < 0.5 * after["nokd"]


def test_the_e0_tower_stays_fixed_while_the_lm_and_fusion_learn(teacher, score_students) -> None:
    model, lm = teacher
    runs, *_ = score_students
    init = student_encoder(lm, 1).state_dict()
    for run in runs.values():
        for name, value in model.tower.state_dict().items():
            torch.testing.assert_close(run.model.tower.state_dict()[name], value, rtol=0, atol=0)
        assert not all(torch.equal(value, init[name]) for name, value in run.lm.state_dict().items())
        assert not all(
            torch.equal(value, model.fusion.state_dict()[name])
            for name, value in run.model.fusion.state_dict().items()
        )


def test_a_student_checkpoint_reloads_as_a_k_layer_joint_model(data, score_students) -> None:
    # What `TrainedRun.load` does with a run.json naming a 1-layer encoder: rebuild, load, same outputs.
    runs, _, root = score_students
    student = runs["sukd"]
    state = torch.load(root / "sukd" / f"epoch-{student.result.best_epoch}.pt", weights_only=True)
    lm = TextEncoder(EncoderConfig(layers=1, max_length=16))
    lm.load_state_dict(state["lm"])
    model = joint_model(data, "score", lm.dim)
    model.load_state_dict(state["model"])
    torch.testing.assert_close(
        supplementary_outputs(model, lm, data), supplementary_outputs(student.model, student.lm, data)
    )


def test_sukd_on_concat_pulls_the_students_pooled_vector_toward_the_teachers(
    data, teacher, tmp_path: Path
) -> None:
    _, lm = teacher
    model = joint_model(data, "concat", lm.dim).eval()
    targets = supplementary_outputs(model, lm, data)
    torch.testing.assert_close(targets, pooled_vectors(lm, data))
    initial = distance(model, student_encoder(lm, 1), data, targets, "valid")
    config = LoopConfig(epochs=1, batch_size=32, lm_lr=3e-4, max_batches_per_epoch=5)
    student = fit_joint_student(model, lm, data, 1, 100.0, config, tmp_path, targets, progress=False)
    assert distance(student.model, student.lm, data, targets, "valid") < 0.8 * initial


def test_feature_kd_learns_the_teachers_embedding_deterministically(data, teacher, tmp_path: Path) -> None:
    _, lm = teacher
    targets = pooled_vectors(lm, data)
    valid = torch.unique(data.text_index[data.rows("valid")])
    before = float(
        torch.nn.functional.mse_loss(pooled_vectors(student_encoder(lm, 1), data, valid), targets[valid])
    )
    config = LoopConfig(epochs=2, batch_size=16, lm_lr=5e-4, patience=2, max_batches_per_epoch=3)
    student = fit_feature_kd(lm, data, 1, config, tmp_path / "a", targets, progress=False)
    after = float(torch.nn.functional.mse_loss(pooled_vectors(student.lm, data, valid), targets[valid]))
    assert after < before
    assert after == pytest.approx(student.history[student.best_epoch]["valid_mse"], rel=1e-4)
    reloaded = TextEncoder(EncoderConfig(layers=1, max_length=16))
    reloaded.load_state_dict(torch.load(tmp_path / "a" / FEATURE_KD_WEIGHTS, weights_only=True))
    torch.testing.assert_close(pooled_vectors(reloaded, data, valid), pooled_vectors(student.lm, data, valid))
    rerun = fit_feature_kd(lm, data, 1, config, tmp_path / "b", targets, progress=False)
    for name, value in student.lm.state_dict().items():
        torch.testing.assert_close(rerun.lm.state_dict()[name], value, rtol=0, atol=0)
    texts = [pair_text(q, a) for q, a in data.texts[:64]]
    assert (
        math.isfinite(inference_rows_per_s(student.lm, texts, 32)) and inference_rows_per_s(lm, texts, 32) > 0
    )


def test_conversion_is_the_share_of_the_teacher_features_gain_with_a_paired_ci() -> None:
    rng = np.random.default_rng(0)
    n = 4000
    signal = rng.normal(size=n)
    labels = metrics.Labels(
        np.full(n, 20), rng.binomial(20, 1 / (1 + np.exp(2.5 - signal))), np.arange(n) // 20
    )
    noise = rng.normal(size=n)
    e0 = 1 / (1 + np.exp(2.5 - 0.2 * signal - noise))
    teacher = 1 / (1 + np.exp(2.5 - 1.0 * signal - noise))
    half = 1 / (1 + np.exp(2.5 - 0.5 * signal - noise))
    out = conversion(labels, half, teacher, e0, 0.1, rounds=50, seed=0)
    assert (
        0 < out["auc"]["estimate"] < 1 and out["auc"]["ci"][0] < out["auc"]["estimate"] < out["auc"]["ci"][1]
    )
    gain = metrics.auc(labels, half) - metrics.auc(labels, e0)
    assert out["auc"]["estimate"] == pytest.approx(
        gain / (metrics.auc(labels, teacher) - metrics.auc(labels, e0))
    )
    assert conversion(labels, teacher, teacher, e0, 0.1, rounds=20, seed=0)["rig"][
        "estimate"
    ] == pytest.approx(1)
    # A teacher no better than E0 leaves the ratio undefined, not a number.
    assert conversion(labels, half, e0, e0, 0.1, rounds=20, seed=0)["auc"] == {"estimate": None, "ci": None}


def test_a_teacher_without_fusion_or_a_negative_weight_is_refused(data, teacher, tmp_path: Path) -> None:
    model, lm = teacher
    baseline = CtrModel(InputShape(data.vocab_sizes, data.dense.shape[1]), NetConfig())
    with pytest.raises(UserError, match="no text fusion"):
        supplementary_outputs(baseline, lm, data)
    with pytest.raises(UserError, match="no text fusion"):
        fit_joint_student(baseline, lm, data, 1, 0.0, LOOP, tmp_path, progress=False)
    with pytest.raises(UserError, match=">= 0"):
        fit_joint_student(model, lm, data, 1, -1.0, LOOP, tmp_path, progress=False)
