"""The training loop: learns, is deterministic, resumes after an interruption, encodes texts once."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nlpctr.errors import UserError
from nlpctr.models import metrics, trainer
from nlpctr.models.ctr_net import CtrModel, InputShape, NetConfig, TextScorer, binomial_loss
from nlpctr.models.data import FeatureColumns, tensorize
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.prediction import labels_of, predict
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import LoopConfig, fit, step_checkpoint

COLUMNS = FeatureColumns(categorical=("ad_id", "position"), ctr=("ad_id_ctr",), counts=("ad_id_impressions",))
WORDS_GOOD = ["free", "best", "new", "sale", "official"]
WORDS_BAD = ["old", "broken", "spam", "slow", "used"]


def synthetic_frame(n: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Clicks depend on position and on words in the ad text (which the ids do not know)."""
    rng = np.random.default_rng(seed)
    position = rng.integers(1, 6, size=n)
    good = rng.random(n) < 0.5
    word = np.where(good, rng.choice(WORDS_GOOD, n), rng.choice(WORDS_BAD, n))
    ad_text = [f"{w} shoes model {i % 40}" for i, w in enumerate(word)]
    logit = -1.0 - 0.4 * position + 1.5 * good
    clicks = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    split = np.where(rng.random(n) < 0.7, "train", np.where(rng.random(n) < 0.5, "valid", "test"))
    return pd.DataFrame(
        {
            "impression_id": [f"{i:06d}" for i in range(n)],
            "ad_id": [f"ad{i % 40}" for i in range(n)],
            "position": position.astype(str),
            "ad_id_ctr": 0.1,
            "ad_id_impressions": 50,
            "ad_text": ad_text,
            "impressions": 1,
            "clicks": clicks,
            "split": split,
        }
    )


@pytest.fixture(scope="module")
def data():
    tensors, _ = tensorize(synthetic_frame(), COLUMNS, group="ad_id")
    return tensors


def baseline(data) -> CtrModel:
    torch.manual_seed(0)
    return CtrModel(InputShape(data.vocab_sizes, data.dense.shape[1]), NetConfig(hidden=(32,)))


def test_binomial_loss_equals_expanded_bce() -> None:
    logits = torch.tensor([0.3, -1.2])
    impressions, clicks = torch.tensor([4.0, 3.0]), torch.tensor([1.0, 0.0])
    expanded = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([0.3] * 4 + [-1.2] * 3), torch.tensor([1.0, 0, 0, 0, 0, 0, 0])
    )
    assert binomial_loss(logits, impressions, clicks).item() == pytest.approx(expanded.item(), rel=1e-6)


def test_baseline_learns_position_and_is_deterministic(data, tmp_path: Path) -> None:
    config = LoopConfig(epochs=3, batch_size=128, lr=3e-3)
    a, b = baseline(data), baseline(data)
    fit(a, data, config, tmp_path / "a", progress=False)
    fit(b, data, config, tmp_path / "b", progress=False)
    test = data.rows("test")
    pa, pb = predict(a, data, test, None), predict(b, data, test, None)
    np.testing.assert_array_equal(pa, pb)
    labels_auc = metrics.auc(
        metrics.Labels(data.impressions[test].numpy().astype(int), data.clicks[test].numpy().astype(int)), pa
    )
    assert labels_auc > 0.6


def test_interrupted_run_resumes_to_the_same_weights(data, tmp_path: Path) -> None:
    full = baseline(data)
    fit(full, data, LoopConfig(epochs=3, batch_size=128, patience=5), tmp_path / "full", progress=False)
    part = baseline(data)
    fit(part, data, LoopConfig(epochs=1, batch_size=128, patience=5), tmp_path / "part", progress=False)
    resumed = baseline(data)  # a fresh process: weights come from the checkpoint
    result = fit(
        resumed, data, LoopConfig(epochs=3, batch_size=128, patience=5), tmp_path / "part", progress=False
    )
    assert len(result.history) == 3
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)
    state = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert state["epoch"] == 2


def test_joint_lm_learns_text_signal_and_encodes_each_text_once(data, tmp_path: Path) -> None:
    lm = TextEncoder(EncoderConfig(layers=1, max_length=16), trainable=True)
    texts = TextBatcher.for_data(lm, data)
    calls: list[int] = []
    lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    torch.manual_seed(0)
    scorer = TextScorer(lm.dim)
    fit(scorer, data, LoopConfig(epochs=1, batch_size=64, lm_lr=1e-4, lr=1e-3, max_batches_per_epoch=25,
                                 early_stop="auc"), tmp_path / "lm", texts=texts, progress=False)  # fmt: skip
    rows = data.rows("train")[:64]
    calls.clear()
    with torch.no_grad():
        texts.vectors(data.text_index[rows])
    assert calls == [len(torch.unique(data.text_index[rows]))]
    test = data.rows("test")
    p = predict(scorer, data, test, texts)
    auc = metrics.auc(
        metrics.Labels(data.impressions[test].numpy().astype(int), data.clicks[test].numpy().astype(int)), p
    )
    assert auc > 0.6  # the words carry the signal; ids and position are not inputs here


@pytest.mark.parametrize("fusion", ["score", "concat", "gate"])
def test_warm_start_computes_exactly_e0_before_joint_training(data, fusion: str) -> None:
    e0 = baseline(data)
    torch.manual_seed(1)
    joint = CtrModel(InputShape(data.vocab_sizes, data.dense.shape[1]), NetConfig(hidden=(32,)), fusion, 8)
    joint.warm_start(e0)
    rows = torch.arange(64)
    vectors = torch.randn(64, 8)
    e0.eval(), joint.eval()
    with torch.no_grad():
        expected = e0(data.categorical[rows], data.dense[rows])
        got = joint(data.categorical[rows], data.dense[rows], (), vectors)
    assert torch.equal(got, expected)  # bitwise: the fusion adds an exact zero
    assert all(
        torch.equal(a, b) for a, b in zip(joint.tower.parameters(), e0.tower.parameters(), strict=True)
    )
    with pytest.raises(ValueError, match="without a text fusion"):
        e0.warm_start(joint)


@pytest.mark.parametrize("fusion", ["concat", "gate"])
def test_a_checkpoint_with_the_fused_columns_in_the_first_layer_still_loads(data, fusion: str) -> None:
    shape = InputShape(data.vocab_sizes, data.dense.shape[1])
    torch.manual_seed(2)
    model = CtrModel(shape, NetConfig(hidden=(32,)), fusion, 8)
    state = model.state_dict()
    old = {k: v for k, v in state.items() if k != "fusion.into_mlp.weight"}  # the layout before W_u moved
    old["tower.mlp.net.0.weight"] = torch.cat(
        [state["tower.mlp.net.0.weight"], state["fusion.into_mlp.weight"]], 1
    )
    loaded = CtrModel(shape, NetConfig(hidden=(32,)), fusion, 8)
    loaded.load_state_dict(old)
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


class Interrupted(Exception):
    pass


def interrupt_at_evaluation(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    """Make the n-th validation pass raise, as a kill between two evaluations would."""
    real, calls = trainer.predict_split, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Interrupted
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "predict_split", flaky)


def test_stepwise_evaluations_keep_the_best_state(data, tmp_path: Path) -> None:
    config = LoopConfig(
        epochs=2, batch_size=128, lr=3e-3, patience=20, eval_every_steps=5, eval_at_start=True
    )
    model = baseline(data)
    result = fit(model, data, config, tmp_path, progress=False)
    per_epoch = math.ceil(data.rows_in("train") / 128)
    steps = [0, *range(5, per_epoch, 5), per_epoch, *range(per_epoch + 5 - per_epoch % 5, 2 * per_epoch, 5)]
    assert [h.step for h in result.history] == [*steps, 2 * per_epoch]
    assert result.history[0].train_loss is None and result.steps == 2 * per_epoch
    best = min(result.history, key=lambda h: h.valid_logloss)
    assert result.best == best and result.checkpoint == tmp_path / "best.pt"
    assert not list(tmp_path.glob("epoch-*.pt"))
    valid = data.rows("valid")
    assert metrics.logloss(labels_of(data, valid), predict(model, data, valid, None)) == best.valid_logloss


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_a_run_interrupted_mid_epoch_resumes_to_the_same_weights(
    data, tmp_path: Path, monkeypatch, ema_decay: float
) -> None:
    config = LoopConfig(
        epochs=2, batch_size=128, patience=20, eval_every_steps=5, eval_at_start=True, ema_decay=ema_decay
    )
    full = baseline(data)
    expected = fit(full, data, config, tmp_path / "full", progress=False)
    interrupt_at_evaluation(monkeypatch, 4)  # after the evaluations at steps 0, 5, 10
    with pytest.raises(Interrupted):
        fit(baseline(data), data, config, tmp_path / "part", progress=False)
    monkeypatch.undo()
    state = torch.load(tmp_path / "part" / "last.pt", weights_only=True)
    assert (state["step"], state["batches_done"], state["epoch_done"]) == (10, 10, False)
    resumed = baseline(data)  # a fresh process: weights, optimizer, RNGs and data order from last.pt
    result = fit(resumed, data, config, tmp_path / "part", progress=False)
    assert result.history == expected.history  # every evaluation, to the last bit
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_an_averaged_run_validates_and_keeps_the_average_not_the_last_step(data, tmp_path: Path) -> None:
    config = LoopConfig(
        epochs=1, batch_size=128, lr=3e-3, patience=20, eval_every_steps=5, eval_at_start=True,
        ema_decay=0.8, keep_checkpoints=True,
    )  # fmt: skip
    model = baseline(data)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(model, data, config, tmp_path, progress=False)
    last = result.history[-1]
    raw = torch.load(tmp_path / "last.pt", weights_only=True)["model"]  # what training stepped
    averaged = torch.load(tmp_path / step_checkpoint(last.step), weights_only=True)["model"]
    trained = [k for k, v in start.items() if v.is_floating_point() and not torch.equal(raw[k], v)]
    assert trained and all(not torch.equal(raw[k], averaged[k]) for k in trained)
    valid = data.rows("valid")
    for weights, differs in ((averaged, False), (raw, True)):
        model.load_state_dict(weights)
        logloss = metrics.logloss(labels_of(data, valid), predict(model, data, valid, None))
        assert (logloss != last.valid_logloss) is differs  # the history validated the average
    with pytest.raises(UserError, match="ema_decay"):
        LoopConfig(ema_decay=1.0)
