"""The in-memory cache of frozen-prefix states: each text's hidden states after an encoder's
frozen embeddings and lower layers, computed once and shared by every `TextEncoder`
(models/encoder.py) of a process with the same frozen weights. models/state_store.py keeps
the same states on disk across processes.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

import torch
from torch import nn

CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def weights_digest(modules: Iterable[nn.Module]) -> str:
    """A hash of the modules' parameters and buffers: two encoders whose frozen prefixes have
    the same weights share a cache (and a store folder)."""
    digest = hashlib.sha1()
    for module in modules:
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class StateCache:
    """Hidden states of texts after an encoder's frozen prefix (embeddings + lower layers).

    One (tokens, hidden) tensor per text, its real tokens only (no padding), keyed by its token
    ids, stored in `dtype`; states past `max_bytes` are not kept (they are recomputed when needed).
    """

    def __init__(self, dtype: torch.dtype, max_bytes: int) -> None:
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.bytes = 0
        # Per store folder, the texts known to be kept there (read from it or written to it):
        # a state this process holds from another data folder's run is not in this one's yet.
        self.kept: dict[str, set[tuple[int, ...]]] = {}

    def __len__(self) -> int:
        return len(self.states)

    def get(self, key: tuple[int, ...]) -> torch.Tensor | None:
        return self.states.get(key)

    def put(self, key: tuple[int, ...], state: torch.Tensor) -> None:
        size = state.numel() * state.element_size()
        if key not in self.states and self.bytes + size <= self.max_bytes:
            self.states[key] = state
            self.bytes += size


# Encoders with the same frozen prefix (the same weights, e.g. the three E3 fusions of one
# experiment, or a trained run reloaded for evaluation) share one cache in a process.
_SHARED_CACHES: OrderedDict[tuple, StateCache] = OrderedDict()
_SHARED_KEEP = 2  # prefixes kept at once; the least recently attached is dropped first


def shared_cache(key: tuple, dtype: torch.dtype, max_bytes: int) -> StateCache:
    """The process's cache for `key` (a prefix's weights, depth, dtype and device), made on first use."""
    cache = _SHARED_CACHES.pop(key, None)
    if cache is None:
        cache = StateCache(dtype, max_bytes)
    _SHARED_CACHES[key] = cache
    while len(_SHARED_CACHES) > _SHARED_KEEP:
        _SHARED_CACHES.popitem(last=False)
    return cache


def clear_state_caches() -> None:
    """Drop every cached frozen-prefix state of this process (tests, memory)."""
    _SHARED_CACHES.clear()
