"""How an LM reads (query, ad) pairs (models/text_batches.py): the cross reading is one text per
pair, the separate one its query and ad apart with their product; each text a batch needs is
encoded once, and a frozen LM's texts are encoded once for the whole stage."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nlpctr.errors import UserError
from nlpctr.models.encoder import EncoderConfig, TextEncoder
from nlpctr.models.text_batches import TextBatcher, has_query, pair_text

PAIRS = [
    ("red shoes", "cheap red shoes on sale"),
    ("red shoes", "blue hats"),
    (None, "blue hats"),
    ("hats", "blue hats"),
]


@pytest.fixture(scope="module")
def lms() -> dict[str, TextEncoder]:
    return {
        reading: TextEncoder(EncoderConfig(layers=1, max_length=16, pair_reading=reading))
        for reading in ("cross", "separate")
    }


def encoded(lm: TextEncoder, texts: list[str]) -> torch.Tensor:
    return torch.as_tensor(lm.encode(texts))


def test_the_cross_reading_is_one_text_per_pair(lms: dict[str, TextEncoder]) -> None:
    lm = lms["cross"]
    batcher = TextBatcher(lm, has_query(PAIRS))
    assert batcher.dim == lm.dim
    want = encoded(lm, [pair_text(q, a) for q, a in PAIRS])
    torch.testing.assert_close(batcher.encode_pairs(PAIRS), want)


def test_the_separate_reading_is_query_ad_and_their_product(lms: dict[str, TextEncoder]) -> None:
    lm = lms["separate"]
    batcher = TextBatcher(lm, with_query=True)
    assert batcher.dim == 3 * lm.dim
    got = batcher.encode_pairs(PAIRS)
    query = encoded(lm, ["red shoes", "red shoes", "x", "hats"])
    query[2] = 0.0  # no query: its part is zero
    ad = encoded(lm, [a for _, a in PAIRS])
    torch.testing.assert_close(got, torch.cat([query, ad, query * ad], dim=1))
    assert version_differs(lm)
    # data without any query: the ad's vector alone, as the cross reading gives it
    ads_only = TextBatcher(lm, with_query=False)
    assert ads_only.dim == lm.dim
    torch.testing.assert_close(ads_only.encode_pairs([(None, "blue hats")]), encoded(lm, ["blue hats"]))


def version_differs(lm: TextEncoder) -> bool:
    cross = EncoderConfig(layers=1, max_length=16)
    return lm.config.version != cross.version and lm.config.version.startswith(cross.version)


def test_a_batch_encodes_each_distinct_text_once(lms: dict[str, TextEncoder]) -> None:
    lm = lms["separate"]
    batcher = TextBatcher.for_data(lm, SimpleNamespace(texts=PAIRS))  # type: ignore[arg-type]
    assert batcher.with_query and len(batcher.units) == 4  # 2 queries, 2 ads, "blue hats" once
    sizes: list[int] = []
    hook = lm.model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    rows = torch.tensor([0, 1, 2, 3, 0, 1])
    try:
        with torch.no_grad():
            got = batcher.vectors(rows)
        assert sizes == [4]  # one forward over the four distinct texts
        torch.testing.assert_close(got, batcher.encode_pairs(PAIRS)[rows])
        sizes.clear()
        with batcher.frozen_lm():
            assert sizes == [4]  # the stage's one encoding
            frozen = batcher.vectors(rows)
            assert sizes == [4]  # then looked up
        torch.testing.assert_close(frozen, got)
    finally:
        hook.remove()


def test_an_unknown_reading_is_refused() -> None:
    with pytest.raises(UserError, match="pair_reading must be cross or separate"):
        EncoderConfig(pair_reading="both")


@pytest.mark.parametrize("fused", [False, True])
def test_inference_encodes_a_text_once_until_a_weight_changes(fused: bool) -> None:
    """A finished run's passes (test, write-back) share vectors; an optimiser step (fused too:
    it bumps no version counter) and a loaded state drop them."""
    lm = TextEncoder(EncoderConfig(layers=1, max_length=16, pair_reading="separate"), trainable=True)
    batcher = TextBatcher(lm, with_query=True)
    lm.eval()
    first = batcher.encode_pairs(PAIRS)
    assert batcher.encoded_at_inference == 4  # "red shoes", "hats", and the two ads
    torch.testing.assert_close(batcher.encode_pairs(PAIRS[1:]), first[1:])
    assert batcher.encoded_at_inference == 4  # a second pass with the same weights: looked up
    start = {k: v.clone() for k, v in lm.state_dict().items()}

    trainable = [p for p in lm.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(trainable, lr=1e-2, fused=fused or None)
    lm.train()
    batcher.encode_tokens([lm.token_ids("blue hats")]).pow(2).sum().backward()
    optimiser.step()
    lm.eval()
    again = batcher.encode_pairs(PAIRS)
    assert batcher.encoded_at_inference == 8  # new weights: every text encoded again
    assert not torch.allclose(again, first)
    torch.testing.assert_close(again, TextBatcher(lm, with_query=True, cache_limit=0).encode_pairs(PAIRS))

    lm.load_state_dict(start)  # back to the first weights: encoded again, as at first
    torch.testing.assert_close(batcher.encode_pairs(PAIRS), first)
    assert batcher.encoded_at_inference == 12
