"""The frozen-BERT text encoder: a BERT-family model loaded offline, optionally truncated, pooled.

The encoder is MiniLM-L6 by default; `EncoderConfig.name` (`--encoder NAME_OR_PATH`) names
another one, an installed package or a folder (`models/encoder_source.py` resolves it). One
place names the encoder (`EncoderConfig.version` and `EncoderConfig.slug`, which start with its
identity and revision); every embedding, folder and feature view downstream carries those
strings as provenance, so two encoders are never mixed. Torch and transformers only: no Beam
here (DESIGN.md).
"""

from __future__ import annotations

import os

# huggingface_hub reads HF_HUB_OFFLINE when it is first imported, so this must precede the
# transformers import; `local_files_only=True` below also holds if it was imported earlier.
os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.metadata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging as hf_logging

from nlpctr.atomic import JsonObject
from nlpctr.config_files import check_integer, is_integer
from nlpctr.errors import UserError
from nlpctr.models.device import CPU, Placement
from nlpctr.models.encoder_source import (
    DEFAULT_ENCODER,
    DEFAULT_MODEL_NAME,
    EncoderSource,
    resolve_encoder,
)
from nlpctr.models.state_cache import CACHE_DTYPES, StateCache, shared_cache, weights_digest
from nlpctr.models.state_store import PrefixKey, StateStore, active_root

MODEL_NAME = DEFAULT_MODEL_NAME
MODEL_PACKAGE = DEFAULT_ENCODER
MAX_LAYERS = 6  # of the default encoder (MiniLM-L6); another's depth comes from its config
EMBEDDING_DIM = 384  # the default encoder's width; another's comes from its config
# BERT's learned position table has 512 rows; max_length counts [CLS] and [SEP] too.
_MAX_POSITIONS = 512
ENCODE_CHUNK = 65_536  # texts tokenised at a time by `TextEncoder.encode`
Pooling = Literal["mean", "cls"]
_POOLINGS: tuple[str, ...] = ("mean", "cls")


@cache
def model_package_version() -> str:
    """Installed version of the package that ships the default weights (part of the provenance)."""
    return importlib.metadata.version(MODEL_PACKAGE)


def model_path(name: str = DEFAULT_ENCODER) -> Path:
    """Folder of an encoder's weights and tokenizer (nothing is downloaded); the bundled MiniLM-L6
    by default."""
    return resolve_encoder(name).path


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoder: which model (`name`), how many of its layers, how to pool, how many tokens
    per text.

    `name` is an installed package that bundles an encoder or a folder `save_pretrained` wrote
    (BERT family; stored canonical: a package's normalised name, a folder's absolute path);
    `layers` None means all of its layers. The five fields after `max_length` say how a
    trainable encoder fine-tunes; they are not part of its identity (`version`, `slug`).
    `pair_reading` says how it reads a (query, ad) pair; a separate reading is part of
    `version`. With `trainable_layers` = k (or `freeze_embeddings`), the
    embeddings and the layers below the top k are frozen (eval mode, no gradient): their output
    for a text never changes, so it is computed once per text and cached (`StateCache`, real
    tokens only, in `cache_dtype`, up to `cache_max_mb`) and each step runs the top k layers alone
    (in bf16 autocast with `autocast: bfloat16`; it applies only above a frozen prefix).
    """

    layers: int | None = None  # the first K layers; None: every layer (set to the depth on init)
    pooling: Pooling = "mean"
    max_length: int = 32
    trainable_layers: int | None = None  # top layers that train; None: all; more than `layers`: all
    freeze_embeddings: bool = False  # keep the token/position embeddings fixed (implied by trainable_layers)
    cache_dtype: str = "float32"  # frozen-prefix states kept per text: float32 (exact) or float16
    cache_max_mb: int = 1024  # beyond this, states are recomputed instead of kept
    autocast: str | None = None  # "bfloat16": the layers above the cached prefix in bf16 autocast
    pair_reading: str = "cross"  # a pair as one text, or its two texts apart (models/text_batches.py)
    name: str = DEFAULT_ENCODER  # the model: an installed package, or a folder (models/encoder_source.py)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise UserError(f"encoder name must be a package name or a folder, got {self.name!r}")
        source = resolve_encoder(self.name)
        object.__setattr__(self, "name", source.name)
        if self.layers is None:
            object.__setattr__(self, "layers", source.depth)
        depth = source.depth
        if not is_integer(self.layers):
            raise UserError(f"encoder layers must be an integer in 1..{depth}, got {self.layers!r}")
        if not 1 <= self.layers <= depth:
            raise UserError(
                f"encoder layers must be in 1..{depth} ({source.model_name} has {depth}), got {self.layers}"
            )
        if self.pooling not in _POOLINGS:
            raise UserError(f"encoder pooling must be one of {', '.join(_POOLINGS)}, got {self.pooling!r}")
        if not is_integer(self.max_length):
            raise UserError(f"encoder max_length must be an integer, got {self.max_length!r}")
        longest = min(_MAX_POSITIONS, source.max_tokens)
        if not 2 < self.max_length <= longest:
            raise UserError(f"encoder max_length must be in 3..{longest}, got {self.max_length}")
        if self.trainable_layers is not None and (
            not is_integer(self.trainable_layers) or self.trainable_layers < 0
        ):
            raise UserError(
                f"encoder trainable_layers must be null or an integer >= 0, got {self.trainable_layers!r}"
            )
        if not isinstance(self.freeze_embeddings, bool):
            raise UserError(
                f"encoder freeze_embeddings must be true or false, got {self.freeze_embeddings!r}"
            )
        if self.cache_dtype not in CACHE_DTYPES:
            raise UserError(
                f"encoder cache_dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}"
            )
        check_integer("encoder cache_max_mb", self.cache_max_mb, low=0)
        if self.autocast not in (None, "bfloat16"):
            raise UserError(f"encoder autocast must be null or bfloat16, got {self.autocast!r}")
        if self.pair_reading not in ("cross", "separate"):
            raise UserError(f"encoder pair_reading must be cross or separate, got {self.pair_reading!r}")

    @property
    def frozen_layers(self) -> int | None:
        """Layers below the trainable ones (frozen and cached, with the embeddings); None when
        nothing is frozen (every layer and the embeddings train)."""
        if self.trainable_layers is not None:
            return self.layers - min(self.trainable_layers, self.layers)
        return 0 if self.freeze_embeddings else None

    @property
    def source(self) -> EncoderSource:
        """The resolved encoder: its folder, identity, revision, depth and width."""
        return resolve_encoder(self.name)

    @property
    def version(self) -> str:
        """Full provenance string, stored next to every embedding this encoder produces: the
        encoder's identity and revision (`<model>@<package>==<version>`, or `<folder
        name>@sha256:<hash of its files>`), then layers, pooling and length."""
        reading = "/pairs=separate" if self.pair_reading == "separate" else ""  # cross: as before
        return (
            f"{self.source.identity}"
            f"/layers={self.layers}/pooling={self.pooling}/max_length={self.max_length}{reading}"
        )

    @property
    def slug(self) -> str:
        """Short id for folder and Feast feature-view names: [a-z0-9_] only, starts with a letter;
        names the encoder and its revision (the default's: `minilm_l6_mean_len32_v0_1_0`)."""
        assert self.layers is not None  # set by __post_init__
        return self.source.slug(self.layers, self.pooling, self.max_length)

    def fields(self) -> JsonObject:
        """The identity fields, as an embedding manifest records them to rebuild this encoder."""
        return {
            "name": self.name,
            "layers": self.layers,
            "pooling": self.pooling,
            "max_length": self.max_length,
        }


def _load_error(name: str, what: str, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"--encoder {name}: transformers cannot load its {what} ({first})")


def load_tokenizer(name: str = DEFAULT_ENCODER) -> PreTrainedTokenizerBase:
    """An encoder's tokenizer, loaded offline (the default: MiniLM's uncased WordPiece)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path(name), local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise _load_error(name, "tokenizer", exc) from None
    if tokenizer.pad_token_id is None:
        raise UserError(f"--encoder {name}: its tokenizer has no padding token; set one and save it again")
    return tokenizer


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[int]:
    """Token ids of one text ([CLS] ... [SEP], truncated to max_length), unpadded.

    Shared by `TextEncoder` and the Beam job, which tokenises before batching so that it can
    group texts of similar length.
    """
    return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def load_model(layers: int | None = None, name: str = DEFAULT_ENCODER) -> PreTrainedModel:
    """An encoder's model (the bundled MiniLM-L6's BertModel by default), loaded offline and
    truncated to its first `layers` layers (None: all)."""
    layers = EncoderConfig(layers=layers, name=name).layers  # validates, with the config's UserError
    assert layers is not None
    # The local load needs no progress bar: its "Loading weights" bar ignored --no-progress.
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(model_path(name), local_files_only=True)
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise _load_error(name, "weights", exc) from None
    if not hasattr(model, "embeddings") or not hasattr(getattr(model, "encoder", None), "layer"):
        raise UserError(
            f"--encoder {name}: {type(model).__name__} is not laid out as BERT (embeddings, encoder.layer)"
        )
    if layers < len(model.encoder.layer):
        # Keeping the bottom k layers (not re-initialising fewer) is how students and quick runs
        # start from the teacher's weights; the config must agree so save/reload round-trips.
        model.encoder.layer = nn.ModuleList(list(model.encoder.layer)[:layers])
        model.config.num_hidden_layers = layers
    return model


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Pool token states (B, L, H) to (B, H): masked mean over real tokens, or the [CLS] state."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # Padding positions get weight 0, so a text's vector does not depend on its batch mates.
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


FROZEN_BATCH = 64  # texts of one length run through the frozen prefix together


class TextEncoder(nn.Module):
    """An encoder (first k layers) plus pooling: texts in, float32 vectors of its width out (384
    for the default MiniLM-L6).

    Frozen by default (eval mode, no gradients) for the cascade features; trainers that
    fine-tune pass `trainable=True` and call `forward` inside their own loop. The HF model
    is `.model`, the tokenizer `.tokenizer`.

    With a frozen prefix (`EncoderConfig.trainable_layers` or `freeze_embeddings`), the
    embeddings and the layers below the trainable ones never train and always run in eval mode;
    `forward` takes each text's prefix output from `state_cache` (computing what is missing,
    texts of one length together, unpadded) and runs only the layers above it, which gives the
    full encoder's output up to float rounding (padding is masked out of attention either way).

    `placement` (default: the CPU at fp32) is where the weights, the inputs of `forward` and the
    cached states live (one cache per device) and the precision its layers run at
    (`models/device.py`).
    """

    def __init__(
        self, config: EncoderConfig | None = None, *, trainable: bool = False, placement: Placement = CPU
    ) -> None:
        super().__init__()
        self.config = config or EncoderConfig()
        self.tokenizer = load_tokenizer(self.config.name)
        self.placement = placement
        self.model = load_model(self.config.layers, self.config.name).to(placement.device)
        self.model.requires_grad_(trainable)
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler.requires_grad_(False)  # BERT's pooler is unused: `pool` pools
        self.frozen_layers = self.config.frozen_layers
        for module in self.frozen_modules():
            module.requires_grad_(False)
        self.state_cache: StateCache | None = None
        # Counts the occasions on which the weights may have changed, for caches of the LM's
        # outputs (`TextBatcher`): a loaded state, and every forward pass that records gradients
        # (a fused optimiser's step bumps no tensor's version counter).
        self.weights_version = 0
        self.register_load_state_dict_post_hook(lambda module, _keys: module._weights_loaded())
        if self.frozen_layers is not None:
            self._attach_cache()
        self.train(trainable)

    @property
    def device(self) -> torch.device:
        """Where the weights (and the cached frozen-prefix states) are."""
        return self.model.embeddings.word_embeddings.weight.device

    def _weights_loaded(self) -> None:
        self.weights_version += 1
        if self.frozen_layers is not None:
            self._attach_cache()  # new weights (a checkpoint, a teacher's) may change the prefix

    def frozen_modules(self) -> list[nn.Module]:
        """The embeddings and the layers below the trainable ones (none without a frozen prefix)."""
        if self.frozen_layers is None:
            return []
        return [self.model.embeddings, *list(self.model.encoder.layer)[: self.frozen_layers]]

    def train(self, mode: bool = True) -> TextEncoder:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()  # no dropout: the prefix output of a text is fixed, so it can be cached
        return self

    @contextmanager
    def without_cache(self) -> Iterator[None]:
        """Run the whole encoder for every text (timing its real cost: a cache would hide it)."""
        cache, self.state_cache = self.state_cache, None
        try:
            yield
        finally:
            self.state_cache = cache

    def _attach_cache(self) -> None:
        digest = weights_digest(self.frozen_modules())
        dtype = CACHE_DTYPES[self.config.cache_dtype]
        key = (digest, self.frozen_layers, self.config.cache_dtype, str(self.device))
        self.state_cache = shared_cache(key, dtype, self.config.cache_max_mb * 2**20)
        assert self.frozen_layers is not None
        self.prefix_key = PrefixKey(
            self.config.version,
            self.config.slug,
            self.frozen_layers,
            digest,
            self.config.cache_dtype,
            self.device.type,
            FROZEN_BATCH,
        )

    @property
    def dim(self) -> int:
        """Size of the pooled vector (the model's hidden size; 384 for MiniLM)."""
        return int(self.model.config.hidden_size)

    @property
    def pad_token_id(self) -> int:
        """Token id used for padding (0 for MiniLM's vocabulary)."""
        return int(self.tokenizer.pad_token_id)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise with truncation at `max_length` and padding to the longest text only."""
        encoded = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def token_ids(self, text: str) -> list[int]:
        """Token ids of one text ([CLS] ... [SEP], truncated), unpadded; for length-aware batching."""
        return token_ids(self.tokenizer, text, self.config.max_length)

    def pad(self, token_ids: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Right-pad pre-tokenised texts to the longest of them; returns input_ids and attention_mask."""
        longest = max(len(ids) for ids in token_ids)
        input_ids = torch.full((len(token_ids), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled vectors (B, dim); differentiable when the encoder is trainable."""
        if torch.is_grad_enabled():
            self.weights_version += 1  # a training step may follow
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if self.state_cache is None:
            # token_type_ids default to zeros inside BertModel, which is what single texts use.
            with self.placement.autocast():
                hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        else:
            hidden, attention_mask = self._forward_from_cache(input_ids, attention_mask)
        return pool(hidden.float(), attention_mask, self.config.pooling)

    def _run_layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: Sequence[nn.Module]
    ) -> torch.Tensor:
        """BertModel's encoder loop over some of its layers, with the mask it would build."""
        if not layers:
            return hidden
        mask = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    def _compute_frozen(self, keys: Sequence[tuple[int, ...]]) -> dict[tuple[int, ...], torch.Tensor]:
        """Prefix states of texts, computed texts of one length at a time (no padding, so a text's
        state does not depend on the others), kept in the cache; normal tensors even when called
        under inference mode, since training reuses them."""
        assert self.state_cache is not None and self.frozen_layers is not None
        cache = self.state_cache
        device = self.model.embeddings.word_embeddings.weight.device
        layers = list(self.model.encoder.layer)[: self.frozen_layers]
        out: dict[tuple[int, ...], torch.Tensor] = {}
        ordered = sorted(keys, key=lambda k: (len(k), k))
        with torch.inference_mode(False), torch.no_grad():
            for start in range(0, len(ordered), FROZEN_BATCH):
                chunk = ordered[start : start + FROZEN_BATCH]
                for length in sorted({len(k) for k in chunk}):
                    same = [k for k in chunk if len(k) == length]
                    ids = torch.tensor(same, dtype=torch.long, device=device)
                    hidden = self._run_layers(
                        self.model.embeddings(input_ids=ids), torch.ones_like(ids), layers
                    )
                    for row, key in enumerate(same):
                        state = hidden[row].to(cache.dtype, copy=True)
                        cache.put(key, state)
                        out[key] = state
        return out

    def prefill(self, token_ids: Sequence[Sequence[int]]) -> int:
        """Compute and cache the prefix states of texts not cached yet; returns how many were
        computed. Within `state_store.persisted_states(root)`, the states stored there are read
        instead of computed, and those computed are stored."""
        if self.state_cache is None:
            return 0
        cache = self.state_cache
        wanted = list(dict.fromkeys(tuple(ids) for ids in token_ids))
        missing = [k for k in wanted if cache.get(k) is None]
        root = active_root()
        store = StateStore(root, self.prefix_key) if root is not None else None
        kept = cache.kept.setdefault(str(store.folder), set()) if store is not None else set()
        to_read = [k for k in wanted if k not in kept or cache.get(k) is None]
        if store is not None and to_read:
            loaded = store.load(to_read, self.device)
            kept.update(loaded)
            for key, state in loaded.items():
                cache.put(key, state)  # (past the cache's budget, recomputed when needed, as before)
            missing = [k for k in missing if k not in loaded]
            # States this process holds from a run of another data folder: kept here as well.
            held = {k: s for k in to_read if k not in loaded and (s := cache.get(k)) is not None}
            store.save(held)
            kept.update(held)
        for start in range(0, len(missing), ENCODE_CHUNK):
            computed = self._compute_frozen(missing[start : start + ENCODE_CHUNK])
            if store is not None:
                store.save(computed)
                kept.update(computed)
        return len(missing)

    def frozen_states(self, token_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Each text's hidden states after the frozen prefix, (its tokens, hidden) float32."""
        assert self.state_cache is not None
        cache = self.state_cache
        keys = [tuple(ids) for ids in token_ids]
        found = {k: cache.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, v in found.items() if v is None]
        if missing:
            found.update(self._compute_frozen(missing))
        return [found[k].float() for k in keys]  # type: ignore[union-attr]

    def _forward_from_cache(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = attention_mask.sum(dim=1)
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        if not torch.equal(attention_mask.bool(), positions < lengths[:, None]):
            raise ValueError("the cached encoder reads right-padded batches (real tokens first)")
        counts = lengths.tolist()
        states = self.frozen_states([row[:n] for row, n in zip(input_ids.tolist(), counts, strict=True)])
        hidden = nn.utils.rnn.pad_sequence(states, batch_first=True)  # zeros past each text: masked
        mask = attention_mask[:, : hidden.shape[1]]
        layers = list(self.model.encoder.layer)[self.frozen_layers :]
        # --precision bf16/fp16 supersedes the encoder's own (CPU) `autocast: bfloat16` option.
        dtype = self.placement.autocast_dtype or (torch.bfloat16 if self.config.autocast else None)
        if dtype is None:
            return self._run_layers(hidden, mask, layers), mask
        with torch.autocast(hidden.device.type, dtype=dtype):
            return self._run_layers(hidden, mask, layers).float(), mask

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, *, sort_by_length: bool = True
    ) -> np.ndarray:
        """Embed texts as float32 (n, dim), in input order.

        Batches are formed from texts sorted by length (within chunks of ENCODE_CHUNK texts, then
        restored to input order) so that little compute goes to padding; masked pooling makes the
        result independent of that.
        """
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        device = next(self.model.parameters()).device
        # Token ids are Python lists (~1 KB a text): tokenise a chunk at a time, not every text.
        for first in range(0, len(texts), ENCODE_CHUNK):
            chunk = texts[first : first + ENCODE_CHUNK]
            ids = [token_ids(self.tokenizer, t, self.config.max_length) for t in chunk]
            order = list(range(len(chunk)))
            if sort_by_length:
                order.sort(key=lambda i: len(ids[i]))
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    rows = order[start : start + batch_size]
                    batch = self.pad([ids[i] for i in rows])
                    pooled = self(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                    out[[first + i for i in rows]] = pooled.float().cpu().numpy()
        return out
