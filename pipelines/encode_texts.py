"""Encoding for the embedding job (pipelines/embed_text.py): unique texts are tokenised,
batched by token length and run through the frozen encoder of models/encoder.py with Beam's
RunInference, one forward pass per text.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference

from nlpctr.models.encoder import EncoderConfig, TextEncoder, load_tokenizer, token_ids
from nlpctr.pipelines.devices import worker_placement
from nlpctr.pipelines.unique_texts import UniqueText


class TokenizedText(NamedTuple):
    """A unique text, tokenised (unpadded) and ready to batch."""

    text_id: str
    first_seen_us: int
    input_ids: tuple[int, ...]


class Encoded(NamedTuple):
    """One text's vector plus what its forward pass cost, for the job's padding/throughput counts."""

    vector: np.ndarray
    padded_length: int
    batch_size: int
    first_in_batch: bool
    forward_seconds: float


def token_length(example: TokenizedText) -> int:
    """Length used to bucket a text for batching: its number of tokens."""
    return len(example.input_ids)


class TokenizeTexts(beam.DoFn):
    """(text_id, UniqueText) -> TokenizedText; the tokenizer is loaded once per DoFn instance."""

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self._tokenizer: Any = None

    def setup(self) -> None:
        self._tokenizer = load_tokenizer(self.config.name)

    def process(self, element: tuple[str, UniqueText]) -> Iterator[TokenizedText]:
        text_id, unique = element
        ids = token_ids(self._tokenizer, unique.text, self.config.max_length)
        yield TokenizedText(text_id, unique.first_seen_us, tuple(ids))


class TextEncoderModelHandler(ModelHandler[TokenizedText, PredictionResult, TextEncoder]):
    """RunInference handler for `TextEncoder`: pads each batch to its longest text and pools.

    Beam's HuggingFace handler imports TensorFlow and its PyTorch handlers expect
    ready-made tensors of one shape, so this handler loads the encoder itself
    (`from_pretrained` inside `TextEncoder`) and does the dynamic padding.

    Model sharing: MiniLM-L6 is 22.7 M parameters (~90 MB in float32), so one private copy
    per worker process is cheap and lets every process run its own forward passes in
    parallel. `large_model=True` / `model_copies` would instead serve one copy from a shared
    process and send every batch to it over IPC: worth it for a multi-GB model, not for this
    one (on a GPU too: a few copies of 90 MB fit any card), so both stay off.

    Device: as Beam's PyTorch handlers with `device='GPU'`, the model is loaded once per worker
    on `device` (`auto`: a GPU when the worker has one), each batch is moved there, and a worker
    without the GPU asked for logs one warning line and runs on its CPU.
    """

    def __init__(
        self, config: EncoderConfig, *, torch_threads: int | None = None, device: str = "auto"
    ) -> None:
        super().__init__(large_model=False, model_copies=None)
        self.config = config
        self.torch_threads = torch_threads
        self.device = device

    def load_model(self) -> TextEncoder:
        placement = worker_placement(self.device)
        if self.torch_threads and placement.device.type == "cpu":
            # Per process: with N worker processes on C cores, C // N threads each avoids
            # oversubscribing the cores (set by `run`).
            torch.set_num_threads(self.torch_threads)
        return TextEncoder(self.config, placement=placement)

    def run_inference(
        self,
        batch: Sequence[TokenizedText],
        model: TextEncoder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        started = time.perf_counter()
        padded = model.pad([example.input_ids for example in batch])
        with torch.inference_mode():
            vectors = model(padded["input_ids"], padded["attention_mask"]).float().cpu().numpy()
        seconds = time.perf_counter() - started
        length = int(padded["input_ids"].shape[1])
        return [
            PredictionResult(example, Encoded(vectors[i], length, len(batch), i == 0, seconds))
            for i, example in enumerate(batch)
        ]

    def get_metrics_namespace(self) -> str:
        return "nlpctr_embed"


class EncodeTexts(beam.PTransform):
    """(text_id, UniqueText) -> PredictionResult(TokenizedText, Encoded), one forward per text.

    Batching by length uses Beam's `SortAndBatchElements` (sorts each bundle by token count,
    then cuts batches of `batch_size`), ahead of a RunInference that skips its own batching.
    It groups only within a bundle, so how much padding it saves depends on the runner's
    bundle sizes; the job reports its padding ratio so that this stays visible.
    Beam 2.77's other length-aware options do not fit a batch job here:
    `batch_length_fn`/`batch_bucket_boundaries` only act on the stateful BatchElements path
    (`max_batch_duration_secs`), whose processing-time timer makes the DirectRunner fall back
    to its legacy bundle runner (no multi_processing; it fails on this pipeline), and
    `max_batch_weight` set on a model handler is forwarded to `BatchElements`, which rejects
    that keyword (TypeError).
    """

    def __init__(
        self, handler: TextEncoderModelHandler, batch_size: int, *, group_by_length: bool = True
    ) -> None:
        super().__init__()
        self.handler = handler
        self.batch_size = batch_size
        self.group_by_length = group_by_length

    def expand(self, texts: beam.PCollection) -> beam.PCollection:
        tokenized = texts | "Tokenize" >> beam.ParDo(TokenizeTexts(self.handler.config))
        if self.group_by_length:
            batches = tokenized | "BatchByLength" >> beam.SortAndBatchElements(
                min_batch_size=1,
                max_batch_size=self.batch_size,
                # No token budget beyond batch_size full-length texts: the count is the limit.
                max_batch_weight=self.batch_size * self.handler.config.max_length + 1,
                element_size_fn=token_length,
            )
        else:
            batches = tokenized | "BatchInArrivalOrder" >> beam.BatchElements(
                min_batch_size=self.batch_size, max_batch_size=self.batch_size
            )
        return batches | "RunInference" >> RunInference(self.handler.with_no_batching())
