"""bench/gpu: what runs on a GPU machine (no Beam, Feast or install there), proven here on a CPU.

`prepare.py` writes the compact data and the packed encoder; `run.sh --smoke` trains the joint
recipe and its probe-only control on them end to end, importing only `models/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from nlpctr.models.encoder import model_path, pool

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

from packed_encoder import pack_encoder, unpack_encoder  # noqa: E402
from train_gpu import plan_steps  # noqa: E402

TEXTS = ["free shoes for the summer", "you will not believe what happened next", "query words 3"]


def test_the_packed_encoder_is_minilm_on_the_texts_it_kept(tmp_path: Path) -> None:
    packed = pack_encoder(tmp_path / "packed", TEXTS)
    assert packed["rows_kept"] < 100 and packed["max_abs_rounding"] < 5e-3  # float16 of weights <= 8
    size = sum(p.stat().st_size for p in (tmp_path / "packed").iterdir())
    assert size < 25 * 2**20  # float16 layers and a few rows of the table, not 90 MB
    unpacked = unpack_encoder(tmp_path / "packed", tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        original, restored = (
            pool(AutoModel.from_pretrained(m, local_files_only=True)(**batch).last_hidden_state,
                 batch["attention_mask"], "mean")
            for m in (model_path(), unpacked)
        )  # fmt: skip
    assert not torch.equal(original, restored)  # float16 weights
    torch.testing.assert_close(restored, original, atol=5e-3, rtol=0)


def test_the_step_plan_is_ten_times_today_or_says_it_is_not() -> None:
    today = {"lm": 568, "all": 400}
    plan = plan_steps(today, 10, 391, None)
    assert plan["reached_steps_multiple"] and plan["multiple_planned"] >= 10
    assert all(plan["planned"][s] >= 10 * today[s] for s in today)
    assert all(plan["planned"][s] - 10 * today[s] < plan["per_epoch"] for s in today)
    tight = plan_steps(today, 10, 391, affordable=4840)  # half of what 10x needs
    assert not tight["reached_steps_multiple"] and 4.5 < tight["multiple_planned"] < 5.5


@pytest.mark.slow
def test_the_gpu_script_runs_end_to_end_on_a_cpu(tmp_path: Path) -> None:
    work, out, returned = tmp_path / "work", tmp_path / "out", tmp_path / "returned"
    argv = ["--datasets", "simulated", "--sim-rows", "1500", "--work", str(work), "--no-progress"]
    prepared = subprocess.run(
        [sys.executable, "bench/gpu/prepare.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert "MiB of 64" in prepared.stdout
    meta = json.loads((work / "simulated" / "meta.json").read_text())
    assert meta["pair_reading"] == "separate" and meta["today_steps"] == {"lm": 600}
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(returned)}
    flags = ["--smoke", "--work", str(work), "--datasets", "simulated", "--out", str(out)]
    done = subprocess.run(
        ["bash", "bench/gpu/run.sh", *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "simulated.json").read_text())
    assert result["placement"]["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert [s["name"] for s in result["stages"]] == ["head", "lm"]
    assert result["steps"]["planned"] == {"lm": 3} and result["config"]["encoder"]["layers"] == 2
    assert result["config"]["encoder"]["trainable_layers"] is None  # every layer trains
    assert result["throughput"]["rows_per_s"] > 0
    assert [c["id"] for c in result["claims"]] == [
        "joint_beats_e0",
        "probe_beats_e0",
        "finetuning_beats_probe",
    ]
    for arm in ("e0", "probe", "joint"):
        assert 0.5 < result["test"][arm]["auc"] < 1
    shares = result["text_ceiling"]["share_rig"]
    assert set(shares) == {"probe", "joint"} and all(np.isfinite(v) for v in shares.values())
    assert "[gpu] python " in done.stdout and "[gpu] simulated: test AUC E0 " in done.stdout
    assert (returned / "out" / "simulated.json").is_file() and (returned / "out" / "summary.md").is_file()
