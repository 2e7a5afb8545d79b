"""How an LM reads a row's (query, ad) texts, and rows -> the LM's vectors.

Two readings of a pair (`encoder.pair_reading`): `cross` (`query [SEP] ad`, one vector, d) and
`separate` ([u_q, u_a, u_q * u_a], 3d). `TextBatcher` encodes each text a batch needs once and,
at inference, caches vectors while the LM's weights do not change. Used by `models.trainer`
and the LM feature write-back. Why `separate`: docs/DESIGN.md, "Modules in detail",
text_batches.py (its measurement: docs/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from nlpctr.models.data import Tensors
from nlpctr.models.device import CPU
from nlpctr.models.encoder import ENCODE_CHUNK, TextEncoder

INFERENCE_CHUNK = 64  # texts encoded together at inference, sorted by length
TRAIN_CHUNK = 128  # texts encoded together in a training step, sorted by length
CACHED_TEXTS = 300_000  # texts whose vectors inference keeps (<= 460 MB at 384-d)
PAIR_READINGS = ("cross", "separate")

Pair = tuple[str | None, str]


def pair_text(query: str | None, ad: str) -> str:
    """The cross reading's one text: the ad text, after the query when there is one."""
    return f"{query} [SEP] {ad}" if query else ad


def pair_units(query: str | None, ad: str, reading: str) -> tuple[str | None, str]:
    """The texts the LM encodes for a pair: (query or None, ad) read apart, or (None, one text)."""
    if reading == "separate":
        return (query or None, ad)
    return (None, pair_text(query, ad))


def has_query(pairs: Sequence[Pair]) -> bool:
    """Whether any pair has a query text (then a separate reading's vectors are 3d)."""
    return any(query is not None for query, _ in pairs)


@dataclass
class TextBatcher:
    """A batch of rows -> the LM's vectors of their pairs, each text the batch needs encoded once.

    `for_data` tokenises an in-memory dataset's texts once up front. A streamed batch carries
    its own texts (`Tensors.texts`), tokenised as it comes. At inference (eval mode, no
    gradient) the vectors of up to `cache_limit` texts are kept, keyed by their token ids, and
    dropped as soon as the LM's weights may have changed (`TextEncoder.weights_version`: a
    loaded state or a forward pass that records gradients; or a parameter's version counter):
    whatever reads the same weights reuses them.

    Token ids, `parts` and text indices are host-side bookkeeping (CPU tensors and lists); the
    vectors live on the LM's device (`TextEncoder.placement`).
    """

    lm: TextEncoder
    with_query: bool = False  # the data has query texts (the separate reading's vector is then 3d)
    units: list[list[int]] = field(default_factory=list)  # token ids of each text the LM encodes
    parts: torch.Tensor = field(default_factory=lambda: torch.empty((0, 2), dtype=torch.long))
    texts: list[Pair] | None = None  # the pairs `parts` describes (row i: its query and ad unit)
    cache_limit: int = CACHED_TEXTS
    cache: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)  # text's token ids -> vector
    cache_weights: tuple[int, ...] = ()  # the LM weights stamp (see `encode_tokens`) of the cached vectors
    encoded_at_inference: int = 0  # texts the LM encoded at inference (what the cache saves shows here)
    fixed: torch.Tensor | None = None  # every unit's vector while the LM is frozen (`frozen_lm`)

    @classmethod
    def for_data(cls, lm: TextEncoder, data: Tensors, with_query: bool | None = None) -> TextBatcher:
        """Every pair of `data` tokenised; `with_query` defaults to whether any pair has a query."""
        batcher = cls(lm, has_query(data.texts) if with_query is None else with_query, texts=data.texts)
        batcher.units, batcher.parts = batcher._tokenise(data.texts)
        return batcher

    @property
    def reading(self) -> str:
        return self.lm.config.pair_reading

    @property
    def dim(self) -> int:
        """Width of a pair's vector."""
        return self.lm.dim * (3 if self.reading == "separate" and self.with_query else 1)

    def _tokenise(self, pairs: Sequence[Pair]) -> tuple[list[list[int]], torch.Tensor]:
        """Token ids of the pairs' distinct units, and each pair's (query unit or -1, ad unit)."""
        index: dict[str, int] = {}
        units: list[list[int]] = []
        parts = torch.empty((len(pairs), 2), dtype=torch.long)
        for row, (query, ad) in enumerate(pairs):
            for column, text in enumerate(pair_units(query, ad, self.reading)):
                if text is None:
                    parts[row, column] = -1
                    continue
                if text not in index:
                    index[text] = len(units)
                    units.append(self.lm.token_ids(text))
                parts[row, column] = index[text]
        return units, parts

    def prefill(self) -> int:
        """Cache the frozen-prefix states of every text tokenised up front (`for_data`), computed
        once and the same way in a resumed process; returns how many were computed."""
        return self.lm.prefill(self.units)

    @contextmanager
    def frozen_lm(self) -> Iterator[None]:
        """The LM frozen (no gradient, eval mode) for a stage that trains only what reads its
        vectors: each text tokenised up front (`for_data`) is encoded once, and looked up."""
        trainable = [p for p in self.lm.parameters() if p.requires_grad]
        was_training = self.lm.training
        self.lm.requires_grad_(False)
        self.lm.eval()
        try:
            if self.units:
                with torch.no_grad():
                    self.fixed = self._encode_sorted(self.units)  # all of them: no cache needed
            yield
        finally:
            self.fixed = None
            for parameter in trainable:
                parameter.requires_grad_(True)
            self.lm.train(was_training)

    def encode_tokens(self, token_ids: Sequence[list[int]]) -> torch.Tensor:
        """The LM's vectors of tokenised texts, encoded in chunks of similar length (little
        padding); at inference the cached ones are looked up and only the rest encoded."""
        if torch.is_grad_enabled() or self.lm.training:
            return self._encode_sorted(token_ids, TRAIN_CHUNK)
        # The LM's own count (loads, trainable forwards) and the parameters' version counters
        # (any other in-place update) say whether the cached vectors come from these weights.
        weights = (self.lm.weights_version, *(p._version for p in self.lm.parameters()))
        if weights != self.cache_weights:
            self.cache.clear()
            self.cache_weights = weights
        keys = [tuple(ids) for ids in token_ids]
        todo = [k for k in dict.fromkeys(keys) if k not in self.cache]
        fresh = dict(zip(todo, self._encode_sorted(todo), strict=True))
        self.encoded_at_inference += len(todo)
        for key in todo[: max(self.cache_limit - len(self.cache), 0)]:
            self.cache[key] = fresh[key]
        if not keys:
            return torch.empty((0, self.lm.dim), device=self.lm.device)
        return torch.stack([self.cache[k] if k in self.cache else fresh[k] for k in keys])

    def _encode_sorted(
        self, token_ids: Sequence[Sequence[int]], chunk: int = INFERENCE_CHUNK
    ) -> torch.Tensor:
        """Vectors of texts, encoded `chunk` at a time in order of length (differentiable when
        the LM trains: the chunks' vectors are put back in input order by one index)."""
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        parts = [
            self.lm(**self.lm.pad([token_ids[i] for i in order[start : start + chunk]]))
            for start in range(0, len(order), chunk)
        ]
        if not parts:
            return torch.empty((0, self.lm.dim), device=self.lm.device)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.as_tensor(order, dtype=torch.long)] = torch.arange(len(order))
        return torch.cat(parts)[inverse]

    def _combine(self, unit_vectors: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """Pair vectors from their units' vectors (`parts` index rows of `unit_vectors`)."""
        parts = parts.to(unit_vectors.device)
        ad = unit_vectors[parts[:, 1]]
        if not (self.reading == "separate" and self.with_query):
            return ad
        has_query = (parts[:, 0] >= 0).unsqueeze(1)
        query = torch.where(has_query, unit_vectors[parts[:, 0].clamp(min=0)], torch.zeros_like(ad))
        return torch.cat([query, ad, query * ad], dim=1)

    def _pair_vectors(self, parts: torch.Tensor, units: Sequence[list[int]]) -> torch.Tensor:
        """Vectors of the pairs `parts` describes, each unit they use encoded once."""
        used = torch.unique(parts[parts >= 0])  # sorted
        encoded = self.encode_tokens([units[i] for i in used.tolist()])
        local = torch.where(parts >= 0, torch.searchsorted(used, parts.clamp(min=0)), -1)
        return self._combine(encoded, local)

    def vectors(self, text_index: torch.Tensor) -> torch.Tensor:
        """Vectors of the pairs `text_index` names (rows of `texts`)."""
        text_index = text_index.cpu()
        if self.fixed is not None:
            return self._combine(self.fixed, self.parts[text_index])
        unique, inverse = torch.unique(text_index, return_inverse=True)
        return self._pair_vectors(self.parts[unique], self.units)[inverse]

    def encode_pairs(self, pairs: Sequence[Pair]) -> torch.Tensor:
        """Vectors of any pairs at inference (n, dim), tokenised a chunk at a time."""
        out = []
        with torch.inference_mode():
            for start in range(0, len(pairs), ENCODE_CHUNK):
                units, parts = self._tokenise(pairs[start : start + ENCODE_CHUNK])
                out.append(self._pair_vectors(parts, units))
        return torch.cat(out) if out else torch.empty((0, self.dim), device=self.lm.device)

    def batch_vectors(self, batch: Tensors) -> torch.Tensor:
        """Vectors of a batch's rows: looked up for `for_data`'s dataset, else tokenised as it comes."""
        if batch.texts is self.texts:
            return self.vectors(batch.text_index)
        unique, inverse = torch.unique(batch.text_index, return_inverse=True)
        units, parts = self._tokenise([batch.texts[i] for i in unique.tolist()])
        return self._pair_vectors(parts, units)[inverse]


class _NoLM(torch.nn.Module):
    """Where a `FixedVectors` has its LM: nothing to train, save or switch between modes."""

    def __init__(self) -> None:
        super().__init__()
        self.placement = CPU  # no LM layers run: no autocast, no loss scaling


class FixedVectors:
    """A frozen LM's vectors given as a table, one row per pair of a dataset (`Tensors.texts`):
    stands where a `TextBatcher` does, for training a head on vectors computed elsewhere (a
    feature's probe). It has no LM parameters, so it never trains and never re-encodes."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table.cpu()
        self.lm = _NoLM()

    @property
    def dim(self) -> int:
        return int(self.table.shape[1])

    def batch_vectors(self, batch: Tensors) -> torch.Tensor:
        return self.table[batch.text_index.cpu()].to(batch.dense.device)

    def prefill(self) -> int:
        return 0

    @contextmanager
    def frozen_lm(self) -> Iterator[None]:
        yield
