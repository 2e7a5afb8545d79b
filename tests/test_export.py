"""`nlpctr export`: E2's and the joint runs' LMs as transformers folders, read back with `AutoModel`
(and as ONNX with onnxruntime), reproducing the LM features the runs wrote to 1e-5.

The runs train a 2-layer BertConfig encoder (tests/test_encoder_choice.py) for a few batches;
students are exported from a real experiment in tests/test_experiment.py.
"""

from __future__ import annotations

import builtins
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_encoder_choice import QUICK, save_tiny_bert, trainable_dataset
from transformers import AutoModel, AutoTokenizer

from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.layout import LmFeatureMeta
from nlpctr.models.encoder import pool
from nlpctr.models.lm_features import text_pairs
from nlpctr.pipelines import cli, export, train

pytestmark = pytest.mark.slow
JOINT = {
    "modes": {
        "joint": {"loop": {"epochs": 1, "batch_size": 16}, "encoder": {"layers": 2, "trainable_layers": 1}}
    }
}
# float32 throughout: the written features and the export then agree to 1e-5 (under the default
# bf16 autocast of the trained layer, the written ones differ from the float32 export by ~5e-5)
SEPARATE = {"encoder": {"max_length": 16, "pair_reading": "separate", "autocast": None}}
CROSS = {"encoder": {"max_length": 16, "pair_reading": "cross", "autocast": None}}  # `query [SEP] ad`


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """E0, E2 and two joint runs (score; concat reading pairs apart) of a tiny encoder."""
    root = tmp_path_factory.mktemp("export")
    tiny = save_tiny_bert(root / "tiny-bert")
    data = trainable_dataset(root / "data", rows=200)
    store.apply(data)
    store.materialize(data)
    configs = {}
    for name, extra in (("cross", CROSS), ("separate", SEPARATE)):
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({**QUICK, **JOINT, **extra}))
    runs_dir = root / "runs"
    common = ["--data", str(data), "--runs-dir", str(runs_dir), "--encoder", str(tiny), "--no-progress"]
    flags = {
        "e0": ["--mode", "baseline"],
        "e2": ["--mode", "cascade-finetuned"],
        "e3s": ["--mode", "joint", "--fusion", "score", "--init-from", "e0"],
        "e3c": ["--mode", "joint", "--fusion", "concat"],
    }
    for name, mode in flags.items():
        config = configs["separate" if name == "e3c" else "cross"]
        train.run([*mode, "--run", name, "--config", str(config), *common])
    return {"root": root, "data": data, "runs": runs_dir}


def written(data: Path, run: str, column: str) -> tuple[list[tuple[str | None, str]], np.ndarray]:
    """Every (query, ad) pair the run wrote its LM feature for, with that feature."""
    meta = LmFeatureMeta.read(data / "lm_features" / run)
    feature = ds.dataset(data / "lm_features" / run / meta.chosen, format="parquet").to_table().to_pandas()
    frame = ds.dataset(data / "impressions", format="parquet").to_table().to_pandas()
    joined = text_pairs(frame).merge(feature, on=list(meta.keys))
    assert len(joined) == len(feature) > 50
    pairs = list(zip(joined["query_text"], joined["ad_text"], strict=True))
    return pairs, np.stack(joined[column].to_numpy()).astype(np.float32)


def transformers_scores(folder: Path, texts: list[str]) -> np.ndarray:
    """What a user's code computes from the folder: AutoModel, mean pooling, the head's layers."""
    model = AutoModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    head = json.loads((folder / "click_head.json").read_text())
    weights = load_file(folder / head["weights"])
    batch = tokenizer(
        texts, padding=True, truncation=True, max_length=head["max_length"], return_tensors="pt"
    )
    with torch.inference_mode():
        hidden = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
        x = pool(hidden, batch["attention_mask"], head["pooling"])
        for layer in head["layers"]:
            x = (
                torch.tanh(x)
                if layer["op"] == "tanh"
                else x @ weights[layer["weight"]].T + weights[layer["bias"]]
            )
    return x.squeeze(-1).numpy()


def pair_texts(pairs: list[tuple[str | None, str]]) -> list[str]:
    return [f"{q} [SEP] {a}" if q else a for q, a in pairs]


def test_e2_reloads_with_transformers_and_gives_the_runs_scores(runs: dict[str, Any]) -> None:
    out = runs["root"] / "exported" / "e2"
    summary = export.run(["--run", "e2", "--runs-dir", str(runs["runs"]), "--out", str(out)])
    assert {"config.json", "model.safetensors", "tokenizer.json", "click_head.safetensors", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert AutoModel.from_pretrained(out).config.num_hidden_layers == 2
    pairs, scores = written(runs["data"], "e2", "lm_score")
    np.testing.assert_allclose(transformers_scores(out, pair_texts(pairs)), scores, atol=1e-5, rtol=0)
    assert all(check["max_abs_diff"] < 1e-5 for check in summary["checks"]) and len(summary["checks"]) == 2
    card = (out / "README.md").read_text()
    results = json.loads((runs["runs"] / "e2" / "results.json").read_text())
    test = results["metrics"]["test"]
    assert f"| AUC | {test['auc']:.4f} [{test['auc_ci'][0]:.4f}, {test['auc_ci'][1]:.4f}] |" in card
    assert f"this LM alone, test AUC | {results['lm']['test_auc_standalone']:.4f}" in card
    assert "`synthetic`" in card and results["provenance"]["encoder_version"] in card
    head = json.loads((out / "click_head.json").read_text())
    assert head["output"] == "logit" and [layer["op"] for layer in head["layers"]] == [
        "linear",
        "tanh",
        "linear",
    ]


def test_joint_runs_export_with_their_fusion_heads(runs: dict[str, Any]) -> None:
    out = runs["root"] / "exported" / "e3s"
    export.run(["--run", "e3s", "--runs-dir", str(runs["runs"]), "--out", str(out)])
    pairs, scores = written(runs["data"], "e3s", "lm_score")
    np.testing.assert_allclose(transformers_scores(out, pair_texts(pairs)), scores, atol=1e-5, rtol=0)
    # concat, pairs read apart: the head is the projection that joins E0's tower (a vector)
    out = runs["root"] / "exported" / "e3c"
    export.run(["--run", "e3c", "--runs-dir", str(runs["runs"]), "--out", str(out)])
    head = json.loads((out / "click_head.json").read_text())
    assert head["output"] == "vector" and head["pair_reading"] == "separate" and head["input_dim"] == 96
    pairs, vectors = written(runs["data"], "e3c", "supplementary")
    np.testing.assert_allclose(export.FolderScorer(out).outputs(pairs)[1], vectors, atol=1e-5, rtol=0)


def test_the_onnx_file_gives_the_runs_scores_in_onnxruntime(runs: dict[str, Any]) -> None:
    ort = pytest.importorskip(
        "onnxruntime", reason="onnxruntime is not installed (pip install 'nlpctr[onnx]')"
    )
    out = runs["root"] / "exported" / "e3s-onnx"
    summary = export.run(["--run", "e3s", "--runs-dir", str(runs["runs"]), "--out", str(out), "--onnx"])
    pairs, scores = written(runs["data"], "e3s", "lm_score")
    tokens = AutoTokenizer.from_pretrained(out)(
        pair_texts(pairs), padding=True, truncation=True, max_length=16
    )
    session = ort.InferenceSession(str(out / "model.onnx"))
    feeds = {k: np.asarray(tokens[k], dtype=np.int64) for k in ("input_ids", "attention_mask")}
    vector, logit = session.run(["pooled_vector", "head_output"], feeds)
    np.testing.assert_allclose(logit, scores, atol=1e-5, rtol=0)
    assert vector.shape == (len(pairs), 32) and summary["onnx"]["max_abs_diff"] < 1e-5
    assert (
        "`model.onnx` (outputs pooled_vector, head_output) run by onnxruntime"
        in (out / "README.md").read_text()
    )


def test_what_cannot_be_exported_gets_one_line(
    runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    runs_dir = str(runs["runs"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's file")
    cases = {
        ("--run", "e0", "--out", str(tmp_path / "a")): "is a baseline run: it has no LM to export",
        ("--run", "nope", "--out", str(tmp_path / "b")): "--run nope is neither a run",
        ("--run", "e2", "--out", str(mine)): "holds no earlier output of `nlpctr export`",
        ("--run", "../e2", "--out", str(tmp_path / "c")): "--run must be a run's folder name",
    }
    for flags, message in cases.items():
        assert cli.main(["export", *flags, "--runs-dir", runs_dir]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nlpctr: error: ") and message in err and err.count("\n") == 1, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert not any((tmp_path / name).exists() for name in "abc")
    real_import = builtins.__import__

    def no_onnxruntime(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'", name="onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(UserError, match=r"pip install 'nlpctr\[onnx\]'"):
        export.run(["--run", "e2", "--runs-dir", runs_dir, "--out", str(tmp_path / "d"), "--onnx"])
    assert not (tmp_path / "d").exists()


def test_an_export_replaces_only_its_own_folder_and_is_deterministic(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "again"
    args = ["--run", "e3c", "--runs-dir", str(runs["runs"]), "--out", str(out)]
    export.run(args)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    export.run(args)  # its own earlier output: replaced whole, with the same bytes
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert (
        pd.DataFrame(json.loads((out / "nlpctr_export.json").read_text())["checks"])["max_abs_diff"].max()
        < 1e-5
    )
