"""The LM recipe of E2 and E3 (models/recipe.py): a run warm-started from E0 never keeps a state worse
than E0 on validation, stage 1 leaves E0's tower alone, resumes are exact, E2 and E3 plan one budget."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import COLUMNS, Interrupted, interrupt_at_evaluation, synthetic_frame

from nlpctr.models import metrics
from nlpctr.models.config import load_config
from nlpctr.models.ctr_net import CtrModel, InputShape, NetConfig, TextScorer
from nlpctr.models.data import Tensors, tensorize
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.prediction import labels_of, predict
from nlpctr.models.recipe import (
    ProbeConfig,
    RecipeConfig,
    Stage2Config,
    fit_recipe,
    param_groups,
    plan,
)
from nlpctr.models.state_cache import clear_state_caches
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import FitResult, LoopConfig, fit

NET = NetConfig(hidden=(32,))
LOOP = LoopConfig(epochs=1, batch_size=32, patience=10, max_batches_per_epoch=8, eval_every_steps=3)
# Learning rates far too high: training hurts, and the run must still end at E0 or better.
HARMFUL_LOOP = dataclasses.replace(LOOP, lr=0.3, lm_lr=3e-3)
HARMFUL = RecipeConfig(stage2=Stage2Config(epochs=1, tower_lr=0.05, head_lr=0.3, lm_lr=3e-3))
GENTLE = RecipeConfig(stage2=Stage2Config(epochs=1))


def fit_joint(model, data, loop, recipe, folder, texts, warm_started, progress=False) -> FitResult:
    stages = plan(loop, recipe, warm_started=warm_started, has_tower=True, tower_lr=loop.lr)
    return fit_recipe(model, data, stages, folder, texts, progress)


@pytest.fixture(scope="module")
def data() -> Tensors:
    return tensorize(synthetic_frame(n=1500, seed=3), COLUMNS, group="ad_id")[0]


@pytest.fixture(scope="module")
def e0(data: Tensors, tmp_path_factory: pytest.TempPathFactory) -> tuple[CtrModel, FitResult]:
    torch.manual_seed(0)
    model = CtrModel(InputShape(data.vocab_sizes, data.dense.shape[1]), NET)
    result = fit(
        model,
        data,
        LoopConfig(epochs=4, batch_size=128, lr=3e-3),
        tmp_path_factory.mktemp("e0"),
        progress=False,
    )
    return model.eval(), result


def joint_model(data: Tensors, e0_model: CtrModel, fusion: str) -> tuple[CtrModel, TextBatcher]:
    lm = TextEncoder(EncoderConfig(layers=2, trainable_layers=1, max_length=16), trainable=True)
    torch.manual_seed(1)
    model = CtrModel(InputShape(data.vocab_sizes, data.dense.shape[1]), NET, fusion, lm.dim)
    model.warm_start(e0_model)
    return model, TextBatcher.for_data(lm, data)


def valid_logloss(model: CtrModel, data: Tensors, texts: TextBatcher | None) -> float:
    valid = data.rows("valid")
    return metrics.logloss(labels_of(data, valid), predict(model, data, valid, texts))


@pytest.mark.parametrize("fusion", ["score", "concat", "gate"])
def test_a_warm_started_run_never_ends_worse_than_e0(data, e0, fusion: str, tmp_path: Path) -> None:
    e0_model, e0_fit = e0
    e0_best = e0_fit.best.valid_logloss
    assert valid_logloss(e0_model, data, None) == e0_best
    model, texts = joint_model(data, e0_model, fusion)
    result = fit_joint(model, data, HARMFUL_LOOP, HARMFUL, tmp_path, texts, warm_started=True)
    assert result.history[0].valid_logloss == e0_best  # step 0 is E0, to the last bit
    assert [s["name"] for s in result.stages] == ["lm", "all"]
    lm, both = result.stages
    assert lm["start_valid_logloss"] == e0_best and both["start_valid_logloss"] == lm["best_valid_logloss"]
    assert lm["best_valid_logloss"] <= e0_best and both["best_valid_logloss"] <= lm["best_valid_logloss"]
    assert result.best.valid_logloss == both["best_valid_logloss"] <= e0_best
    assert max(h.valid_logloss for h in result.history) > e0_best  # the learning rates did hurt
    # the kept weights (model and LM) reproduce the best evaluation exactly
    assert valid_logloss(model, data, texts) == result.best.valid_logloss
    steps = [h.step for h in result.history]
    assert steps == sorted(steps) and result.steps == lm["steps"] + both["steps"] == 16


def test_stage_one_trains_the_lm_and_the_head_and_leaves_e0s_tower(data, e0, tmp_path: Path) -> None:
    e0_model, _ = e0
    model, texts = joint_model(data, e0_model, "concat")
    prefix = {k: v.clone() for k, v in texts.lm.model.embeddings.state_dict().items()}
    before = {k: v.clone() for k, v in texts.lm.model.encoder.layer[1].state_dict().items()}
    result = fit_joint(model, data, LOOP, RecipeConfig(), tmp_path, texts, warm_started=True)
    assert [s["name"] for s in result.stages] == ["lm"]
    for a, b in zip(model.tower.parameters(), e0_model.tower.parameters(), strict=True):
        assert torch.equal(a, b)
    if result.best_step > 0:  # the best state was trained: the head and the top layer moved
        assert model.fusion is not None and model.fusion.into_mlp.weight.abs().sum() > 0
        layer = texts.lm.model.encoder.layer[1].state_dict()
        assert any(not torch.equal(layer[k], v) for k, v in before.items())
    for key, value in texts.lm.model.embeddings.state_dict().items():
        assert torch.equal(value, prefix[key])  # frozen


def test_the_probe_stage_trains_the_head_alone_on_vectors_computed_once(
    data, e0, tmp_path: Path, monkeypatch
) -> None:
    e0_model, e0_fit = e0
    model, texts = joint_model(data, e0_model, "score")
    lm_before = {k: v.clone() for k, v in texts.lm.state_dict().items()}
    encoded: list[int] = []
    real_encode = TextBatcher._encode_sorted  # how inference encodes texts
    monkeypatch.setattr(
        TextBatcher,
        "_encode_sorted",
        lambda self, ids, *chunk: encoded.append(len(ids)) or real_encode(self, ids, *chunk),
    )
    probe_only = RecipeConfig(probe=ProbeConfig(epochs=3, batch_size=64, lr=3e-2, patience=3), lm_stage=False)
    result = fit_joint(model, data, LOOP, probe_only, tmp_path, texts, warm_started=True)
    assert [s["name"] for s in result.stages] == ["head"]
    head = result.stages[0]
    # full epochs at the probe's batch size (the loop's cap of 8 batches does not apply)
    assert head["steps"] == 3 * -(-data.rows_in("train") // 64) and head["batch_size"] == 64
    assert head["start_valid_logloss"] == e0_fit.best.valid_logloss
    assert head["best_valid_logloss"] < head["start_valid_logloss"]  # the head learned in full epochs
    assert encoded == [len(texts.units)]  # every text encoded once, then looked up
    # (batches padded otherwise than the table's chunks: the same vectors up to float rounding)
    assert valid_logloss(model, data, texts) == pytest.approx(result.best.valid_logloss, rel=1e-6)
    for a, b in zip(model.tower.parameters(), e0_model.tower.parameters(), strict=True):
        assert torch.equal(a, b)
    for key, value in texts.lm.state_dict().items():
        assert torch.equal(value, lm_before[key]), key
    assert texts.fixed is None and any(p.requires_grad for p in texts.lm.parameters())  # restored


def test_param_groups_follow_the_stage(data, e0) -> None:
    model, texts = joint_model(data, e0[0], "gate")
    groups = param_groups(model, texts, tower_lr=0.0, head_lr=1e-3, lm_lr=1e-4)
    assert [(g["name"], g["lr"]) for g in groups] == [("head", 1e-3), ("lm", 1e-4)]
    assert not any(p.requires_grad for p in model.tower.parameters())
    lm_params = {id(p) for p in groups[1]["params"]}
    assert lm_params == {id(p) for p in texts.lm.model.encoder.layer[1].parameters()}
    groups = param_groups(model, texts, tower_lr=1e-5, head_lr=1e-4, lm_lr=2e-5)
    assert [(g["name"], g["lr"]) for g in groups] == [("tower", 1e-5), ("head", 1e-4), ("lm", 2e-5)]
    assert all(p.requires_grad for p in model.tower.parameters())


@pytest.mark.parametrize("interrupt_at", [3, 6])  # stage 1 mid-epoch; stage 2 mid-epoch
def test_an_interrupted_joint_run_resumes_to_the_same_weights(
    data, e0, tmp_path: Path, monkeypatch, interrupt_at: int
) -> None:
    model, texts = joint_model(data, e0[0], "score")
    expected = fit_joint(model, data, LOOP, GENTLE, tmp_path / "full", texts, True)
    clear_state_caches()  # the resumed process starts with an empty cache too
    part, part_texts = joint_model(data, e0[0], "score")
    interrupt_at_evaluation(monkeypatch, interrupt_at)
    with pytest.raises(Interrupted):
        fit_joint(part, data, LOOP, GENTLE, tmp_path / "part", part_texts, True)
    monkeypatch.undo()
    clear_state_caches()
    resumed, resumed_texts = joint_model(data, e0[0], "score")  # a fresh process
    result = fit_joint(resumed, data, LOOP, GENTLE, tmp_path / "part", resumed_texts, True)
    assert result.history == expected.history
    assert [{k: v for k, v in s.items() if not k.endswith("_seconds")} for s in result.stages] == [
        {k: v for k, v in s.items() if not k.endswith("_seconds")} for s in expected.stages
    ]
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    for key, value in texts.lm.state_dict().items():
        assert torch.equal(resumed_texts.lm.state_dict()[key], value), key


def test_a_cold_run_is_one_stage_that_trains_everything(data, tmp_path: Path) -> None:
    lm = TextEncoder(EncoderConfig(layers=1, max_length=16, freeze_embeddings=True), trainable=True)
    torch.manual_seed(0)
    model = CtrModel(InputShape(data.vocab_sizes, data.dense.shape[1]), NET, "score", lm.dim)
    loop = dataclasses.replace(LOOP, max_batches_per_epoch=3, lr=2e-3)
    result = fit_joint(model, data, loop, GENTLE, tmp_path, TextBatcher.for_data(lm, data), False)
    assert [(s["name"], s["lr"]["tower"]) for s in result.stages] == [("all", 2e-3)]


def test_bad_recipe_configs_are_refused(tmp_path: Path) -> None:
    from nlpctr.errors import UserError

    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"recipe": {"lm_stage": False, "probe": {"epochs": 0}}}))
    with pytest.raises(UserError, match="without the LM stage"):
        load_config("joint", config)
    config.write_text(yaml.safe_dump({"recipe": {"stage2": {"lr": 0.1}}}))
    with pytest.raises(UserError, match="lr"):
        load_config("joint", config)


def test_e2_and_e3_plan_the_same_lm_stage() -> None:
    """Equal footing: the LM stage of E2 (no tower) and of E3 (E0's tower frozen) is one budget,
    one optimizer schedule and one pair of learning rates; only the probe and stage 2 differ."""
    config = load_config("joint")
    lm_loop, recipe = config.lm_loop, config.recipe
    e2 = plan(
        dataclasses.replace(lm_loop, early_stop="auc"), recipe, warm_started=True, has_tower=False, tower_lr=0
    )
    e3 = plan(lm_loop, recipe, warm_started=True, has_tower=True, tower_lr=1e-3)
    assert [s.name for s in e2] == [s.name for s in e3] == ["head", "lm"]
    for a, b in zip(e2, e3, strict=True):
        same = (
            "epochs",
            "batch_size",
            "max_batches_per_epoch",
            "warmup_steps",
            "decay",
            "lm_lr",
            "lr",
            "seed",
        )
        assert all(getattr(a.loop, k) == getattr(b.loop, k) for k in same)
        assert (a.head_lr, a.lm_lr, a.tower_lr) == (b.head_lr, b.lm_lr, b.tower_lr)
    assert e3[1].loop.warmup_steps > 0 and e3[1].loop.decay != "none"  # warmup and decay
    probe = e3[0].loop  # full epochs, validated at their ends: patience counts epochs
    assert (
        probe.evals_per_epoch is None and not probe.eval_every_steps and probe.max_batches_per_epoch is None
    )
    assert load_config("cascade-finetuned").encoder == config.encoder  # one LM for both


def test_e2s_lm_recipe_trains_a_scorer_from_the_base_rate(data, tmp_path: Path) -> None:
    lm = TextEncoder(EncoderConfig(layers=2, trainable_layers=1, max_length=16), trainable=True)
    texts = TextBatcher.for_data(lm, data)
    train = data.rows("train")
    base_rate = float(data.clicks[train].sum() / data.impressions[train].sum())
    scorer = TextScorer(texts.dim, hidden=16, base_rate=base_rate)
    p0 = predict(scorer, data, data.rows("valid"), texts)
    assert p0.mean() == pytest.approx(base_rate, abs=0.05)  # starts at the base rate, not at 0.5
    loop = dataclasses.replace(LOOP, early_stop="auc", keep_checkpoints=True, lm_lr=1e-3)
    recipe = RecipeConfig(probe=ProbeConfig(epochs=2, batch_size=64, lr=1e-2))
    stages = plan(loop, recipe, warm_started=True, has_tower=False, tower_lr=0.0)
    result = fit_recipe(scorer, data, stages, tmp_path, texts, progress=False)
    assert [s["name"] for s in result.stages] == ["head", "lm"]
    lm_entries = [h for h in result.history if h.stage == "lm"]
    offset = lm_entries[0].step
    for entry in lm_entries:  # every LM-stage evaluation kept as a checkpoint
        assert (tmp_path / "stage1" / f"step-{entry.step - offset}.pt").is_file()
    assert result.best.valid_auc == max(h.valid_auc for h in lm_entries)  # peak AUC kept
    budget = result.stages[1]
    assert (
        budget["rows_seen"] == sum(min(32, data.rows_in("train") - 32 * i) for i in range(budget["steps"]))
        and budget["cpu_seconds"] > 0
    )
