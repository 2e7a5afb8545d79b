"""The LM stage must learn what the probe cannot: on a simulated log whose text effect is the
query-ad agreement (rho = 0: no ID can know it), the LM recipe's stage 1 (the LM's top layer with
the head, E0 frozen) must lower validation log loss below the probe's (the head alone on the
frozen LM's vectors). Today's recipe before this test (batch 32, a constant LM rate of 2e-5, no
warmup, float32) failed it: its LM stage never improved on the probe.

No Beam and no Feast: the simulator's rows go straight to tensors, with ID and context columns
as E0's inputs (no CTR history), as the trainers read them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from nlpctr.models.config import load_config
from nlpctr.models.ctr_net import CtrModel, InputShape, NetConfig
from nlpctr.models.data import FeatureColumns, Tensors, tensorize
from nlpctr.models.encoder import TextEncoder
from nlpctr.models.recipe import fit_recipe, plan
from nlpctr.models.text_batches import TextBatcher
from nlpctr.models.trainer import LoopConfig, fit
from nlpctr.pipelines import simulate

pytestmark = pytest.mark.slow

COLUMNS = FeatureColumns(
    categorical=("ad_id", "query_id", "advertiser_id", "position", "device"), ctr=(), counts=()
)
NET = NetConfig(hidden=(32,))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Tensors:
    log = tmp_path_factory.mktemp("sim") / "log.parquet"
    flags = ["--rows", "6000", "--rho", "0", "--text-strength", "1.5", "--impressions-per-row", "20"]
    simulate.run([*flags, "--seed", "3", "--out", str(log), "--no-progress"])
    frame = pd.read_parquet(log)
    rng = np.random.default_rng(0)
    frame["split"] = rng.choice(["train", "valid", "test"], size=len(frame), p=[0.7, 0.15, 0.15])
    frame["position"] = frame["position"].astype(str)
    return tensorize(frame, COLUMNS, group="query_id")[0]


@pytest.fixture(scope="module")
def e0(data: Tensors, tmp_path_factory: pytest.TempPathFactory) -> CtrModel:
    torch.manual_seed(0)
    model = CtrModel(InputShape(data.vocab_sizes, data.dense.shape[1]), NET)
    loop = LoopConfig(epochs=20, batch_size=256, lr=3e-3, patience=2)
    fit(model, data, loop, tmp_path_factory.mktemp("e0"), progress=False)
    return model.eval()


def stages_of(data: Tensors, e0: CtrModel, lm_loop: LoopConfig, tmp_path: Path) -> dict[str, dict]:
    """The recipe (the defaults' probe and LM stage) on a 2-layer MiniLM, its top layer trained."""
    config = load_config("joint")
    encoder = dataclasses.replace(config.encoder, layers=2, max_length=24)
    lm = TextEncoder(encoder, trainable=True)
    texts = TextBatcher.for_data(lm, data)
    torch.manual_seed(1)
    model = CtrModel(InputShape(data.vocab_sizes, data.dense.shape[1]), NET, "score", texts.dim)
    model.warm_start(e0)
    stages = plan(lm_loop, config.recipe, warm_started=True, has_tower=True, tower_lr=0.0)
    result = fit_recipe(model, data, stages, tmp_path, texts, progress=False)
    return {s["name"]: s for s in result.stages}


def test_the_lm_stage_beats_the_probe_where_the_text_holds_what_frozen_vectors_lack(
    data: Tensors, e0: CtrModel, tmp_path: Path
) -> None:
    lm_loop = dataclasses.replace(load_config("joint").lm_loop, epochs=6)
    stages = stages_of(data, e0, lm_loop, tmp_path)
    probe, lm = stages["head"], stages["lm"]
    assert probe["best_valid_logloss"] < probe["start_valid_logloss"]  # the head learns some of it
    assert lm["start_valid_logloss"] == probe["best_valid_logloss"]  # stage 1 starts at the probe
    gain = probe["best_valid_logloss"] - lm["best_valid_logloss"]
    # the LM stage learns more than noise: a tenth of what the probe itself found over E0
    assert gain > 0.1 * (probe["start_valid_logloss"] - probe["best_valid_logloss"]), stages
