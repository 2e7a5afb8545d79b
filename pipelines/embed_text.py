"""Embed every unique query and ad text once with the frozen encoder (Beam RunInference).

    nlpctr embed --data DIR [--encoder NAME_OR_PATH] [--layers K] [--device auto|cpu|cuda[:N]]
                 [--full] [beam options]

Reads `DIR/impressions/`, writes `DIR/embeddings/<EncoderConfig.slug>/` (part-*.parquet,
_manifest.json, _collisions.jsonl if any) through a staging folder; reuses stored vectors of
the same encoder (`pipelines/embed_reuse.py`). Third Beam job of the flow (docs/DESIGN.md,
"Data flow"); flags: docs/USAGE.md, "Frozen-BERT embeddings"; contracts: docs/DESIGN.md,
"Modules in detail", embed_text.py.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from nlpctr import __version__, prepared
from nlpctr.atomic import JsonObject, write_json
from nlpctr.errors import UserError
from nlpctr.layout import EMBEDDINGS_MANIFEST, IMPRESSIONS, embeddings_dir
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.encoder_source import DEFAULT_ENCODER
from nlpctr.pipelines import embed_reuse
from nlpctr.pipelines.devices import launch_device
from nlpctr.pipelines.encode_texts import Encoded, EncodeTexts, TextEncoderModelHandler
from nlpctr.pipelines.flags import request_from_args
from nlpctr.pipelines.loopback import run_to_completion
from nlpctr.pipelines.outputs import WriteCounts, read_counts, staged_output
from nlpctr.pipelines.unique_texts import INPUT_COLUMNS, ReadUniqueTexts, TextIdCollision

LOG = logging.getLogger(__name__)

EMBEDDING_SCHEMA = pa.schema(
    [
        pa.field("text_id", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32()), nullable=False),
        pa.field("encoder_version", pa.string(), nullable=False),
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
STATS_FILE = "_stats.json"
# Dead letters of text ids that two different texts share (kept beside the embeddings when any).
COLLISIONS_FILE = "_collisions.jsonl"
# Rows per written arrow table (a parquet row group): big enough to amortise, small in memory.
WRITE_BATCH_ROWS = 1024


# ------------------------------------------------------------------------------- writing


def rows_to_table(results: list[PredictionResult], encoder_version: str) -> pa.Table:
    """A batch of inference results -> an arrow table in EMBEDDING_SCHEMA."""
    vectors = np.stack([r.inference.vector for r in results]).astype(np.float32, copy=False)
    n, dim = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    embedding = pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float32()))
    return pa.Table.from_arrays(
        [
            pa.array([r.example.text_id for r in results], pa.string()),
            embedding,
            pa.array([encoder_version] * n, pa.string()),
            pa.array([r.example.first_seen_us for r in results], pa.int64()).cast(
                pa.timestamp("us", tz="UTC")
            ),
        ],
        schema=EMBEDDING_SCHEMA,
    )


class WriteEmbeddings(beam.PTransform):
    """Inference results -> parquet files `<prefix>-SSSSS-of-NNNNN.parquet`; returns row counts."""

    def __init__(self, file_path_prefix: str, encoder_version: str, num_shards: int = 0) -> None:
        super().__init__()
        self.file_path_prefix = file_path_prefix
        self.encoder_version = encoder_version
        self.num_shards = num_shards

    def expand(self, results: beam.PCollection) -> beam.PCollection:
        tables = (
            results
            | "Batch" >> beam.BatchElements(min_batch_size=WRITE_BATCH_ROWS, max_batch_size=WRITE_BATCH_ROWS)
            | "ToArrow" >> beam.Map(rows_to_table, self.encoder_version)
        )
        _ = tables | "WriteParquet" >> beam.io.WriteToParquetBatched(
            self.file_path_prefix,
            EMBEDDING_SCHEMA,
            codec="snappy",
            file_name_suffix=".parquet",
            num_shards=self.num_shards,
        )
        return tables | "CountRows" >> beam.Map(lambda table: ("rows_written", table.num_rows))


def inference_counts(result: PredictionResult) -> Iterator[tuple[str, float]]:
    """Counter pairs of one encoded text; summed they prove one forward per unique text."""
    encoded: Encoded = result.inference
    yield "texts_encoded", 1
    yield "real_tokens", len(result.example.input_ids)
    yield "token_slots", encoded.padded_length  # its row of the padded (B, L) batch
    if encoded.first_in_batch:
        yield "forward_passes", 1
        yield "forward_seconds", encoded.forward_seconds


# ------------------------------------------------------------------------------- the job


class EmbedUniqueTexts(beam.PTransform):
    """The whole job: ReadUniqueTexts -> EncodeTexts -> WriteEmbeddings under `staging`, with
    the counts and the text ids that collided (dead letters)."""

    def __init__(
        self,
        impressions_pattern: str,
        staging: Path,
        handler: TextEncoderModelHandler,
        batch_size: int,
        *,
        group_by_length: bool = True,
        num_shards: int = 0,
        stored: embed_reuse.StoredEmbeddings | None = None,
    ) -> None:
        super().__init__()
        self.impressions_pattern, self.staging, self.handler = impressions_pattern, staging, handler
        self.batch_size, self.group_by_length, self.num_shards = batch_size, group_by_length, num_shards
        self.stored = stored  # a published folder of this encoder to reuse vectors from

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.PDone:
        staging, handler = self.staging, self.handler
        found = pbegin | "ReadUniqueTexts" >> ReadUniqueTexts(self.impressions_pattern)
        unique, collisions = found["texts"], found["collisions"]
        split = embed_reuse.reuse_stored(unique, staging, self.stored)
        results = split.to_encode | "EncodeTexts" >> EncodeTexts(
            handler, self.batch_size, group_by_length=self.group_by_length
        )
        rows = results if split.reused is None else (results, split.reused) | "WithReused" >> beam.Flatten()
        written = rows | "WriteEmbeddings" >> WriteEmbeddings(
            str(staging / "part"), handler.config.version, self.num_shards
        )
        _ = (
            collisions
            | "CollisionJson" >> beam.Map(TextIdCollision.to_json)
            | "WriteCollisions" >> beam.io.WriteToText(str(staging / COLLISIONS_FILE), shard_name_template="")
        )
        counts = [
            unique | "CountUnique" >> beam.Map(lambda _: ("unique_texts", 1)),
            collisions | "CountCollisions" >> beam.Map(lambda _: ("text_id_collisions", 1)),
            results | "CountInference" >> beam.FlatMap(inference_counts),
            written,
            *split.counts,
        ]
        return tuple(counts) | "WriteStats" >> WriteCounts(str(staging / STATS_FILE))


def check_impressions(data: Path) -> str:
    """The glob of the impressions files under `data`; UserError naming the fix if unusable."""
    folder = data / IMPRESSIONS
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if not files:
        raise UserError(
            f"no impressions in {folder} (expected *.parquet); run `nlpctr data prepare --dataset NAME "
            f"--out {data}` first"
        )
    missing = [c for c in INPUT_COLUMNS if c not in pq.read_schema(files[0]).names]
    if missing:
        raise UserError(
            f"{files[0]} lacks column(s) {', '.join(missing)} of the canonical impression schema; "
            f"re-run `nlpctr data prepare` to rebuild {folder}"
        )
    return str(folder / "*.parquet")


def default_torch_threads(options: PipelineOptions) -> int | None:
    """Threads per worker process: the cores split among DirectRunner's worker processes.

    Left to torch elsewhere (in-process runs; remote runners size their own workers).
    """
    direct = options.view_as(DirectOptions)
    workers = direct.direct_num_workers or 1
    if direct.direct_running_mode == "multi_processing" and workers > 1:
        return max(1, (os.cpu_count() or 1) // workers)
    return None


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    defaults = EncoderConfig()
    parser = argparse.ArgumentParser(
        prog="nlpctr embed", description="Embed each unique query/ad text once with the frozen encoder."
    )
    parser.add_argument("--data", required=True, type=Path, help="dataset folder (holds impressions/)")
    parser.add_argument(
        "--encoder",
        default=DEFAULT_ENCODER,
        help=f"an installed package bundling a BERT-family encoder, or a folder save_pretrained wrote "
        f"(default {DEFAULT_ENCODER}: MiniLM-L6)",
    )
    parser.add_argument("--layers", type=int, default=None, help="keep the first K layers (default: all)")
    parser.add_argument("--pooling", choices=["mean", "cls"], default=defaults.pooling)
    parser.add_argument("--max-length", type=int, default=defaults.max_length, help="tokens per text")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass")
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N"
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="torch threads per worker process (default: cores / DirectRunner workers)",
    )
    parser.add_argument(
        "--no-length-grouping",
        action="store_true",
        help="batch texts in arrival order instead of by token length (for comparison)",
    )
    parser.add_argument("--num-shards", type=int, default=0, help="output files (0: the runner decides)")
    parser.add_argument(
        "--full", action="store_true", help="re-embed every text (default: reuse the stored vectors)"
    )
    return parser.parse_known_args(argv)


@dataclass(frozen=True)
class EmbedRequest:
    """One `nlpctr embed` run: which encoder embeds which prepared folder, and how.

    Raises:
        UserError: a batch size or thread count below 1.
    """

    data: Path  # a prepared dataset folder (holds impressions/)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    batch_size: int = 64  # texts per forward pass
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda or cuda:N
    torch_threads: int | None = None  # per worker process (None: cores / DirectRunner workers)
    group_by_length: bool = True  # batch texts of similar token length together
    num_shards: int = 0  # output files (0: the runner decides)
    beam: tuple[str, ...] = ()  # Beam pipeline options
    reuse: bool = True  # reuse the vectors this encoder already stored there (embed_reuse)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise UserError(f"--torch-threads must be >= 1, got {self.torch_threads}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, beam: Sequence[str]) -> EmbedRequest:
        encoder = EncoderConfig(
            layers=args.layers, pooling=args.pooling, max_length=args.max_length, name=args.encoder
        )
        return request_from_args(
            cls,
            args,
            encoder=encoder,
            group_by_length=not args.no_length_grouping,
            beam=tuple(beam),
            reuse=not args.full,
        )


@dataclass(frozen=True)
class EmbedSummary:
    """What an embedding run wrote and what its forward passes cost."""

    encoder_version: str
    out: str  # the embedding folder, DIR/embeddings/<slug>/
    unique_texts: int
    text_id_collisions: int  # ids two texts share: dead letters, not embedded
    rows_written: int
    forward_passes: int
    texts_encoded: int
    texts_reused: int  # stored vectors copied (embed_reuse); unique == encoded + reused
    batch_size: int
    device: str
    group_by_length: bool
    real_tokens: int
    token_slots: int  # rows x padded length, over every batch
    padding_ratio: float
    wall_seconds: float
    texts_per_second: float
    # Summed over worker processes: the encoder's own rate, without Beam's overhead.
    forward_seconds: float
    forward_texts_per_second: float
    summary: str

    def to_dict(self) -> JsonObject:
        return asdict(self)


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> JsonObject:
    """`nlpctr embed`: the flags as an `EmbedRequest` to `embed`; returns its summary.
    `test_pipeline` (a `TestPipeline`) replaces the pipeline built from the Beam options, as in
    Beam's own examples."""
    args, beam_args = parse_args(argv)
    return embed(EmbedRequest.from_args(args, beam_args), test_pipeline).to_dict()


def embed(request: EmbedRequest, test_pipeline: beam.Pipeline | None = None) -> EmbedSummary:
    """Embed every unique query and ad text of a prepared folder once, into
    `DIR/embeddings/<slug>/`.

    Args:
        request: the folder, the encoder and how to batch and place it.
        test_pipeline: replaces the pipeline built from `request.beam` (tests).

    Returns:
        The counts (one forward per unique text, checked), the padding and the rates.

    Raises:
        UserError: no impressions (or no texts) in the folder, a damaged file (named with its
            fix), a device that is not there, or an output folder that is not the job's.
    """
    options = PipelineOptions(list(request.beam))
    device = launch_device(request.device, options)
    data = Path(request.data).resolve()
    with prepared.reading(data, [IMPRESSIONS]):  # a damaged file named, with its fix
        return _embed(request, options, device, data, test_pipeline)


def _embed(
    request: EmbedRequest,
    options: PipelineOptions,
    device: str,
    data: Path,
    test_pipeline: beam.Pipeline | None,
) -> EmbedSummary:
    config = request.encoder
    pattern = check_impressions(data)
    out = embeddings_dir(data, config.slug)
    threads = request.torch_threads or default_torch_threads(options)
    handler = TextEncoderModelHandler(config, torch_threads=threads, device=device)
    with staged_output(out, "embed", flag="--data", claim_flag=f"--data {data}:") as staging:
        stored = embed_reuse.find_stored(out, config) if request.reuse else None
        started = time.perf_counter()
        pipeline = test_pipeline if test_pipeline is not None else beam.Pipeline(options=options)
        _ = pipeline | "EmbedUniqueTexts" >> EmbedUniqueTexts(
            pattern,
            staging,
            handler,
            request.batch_size,
            group_by_length=request.group_by_length,
            num_shards=request.num_shards,
            stored=stored,
        )
        run_to_completion(pipeline)
        wall = time.perf_counter() - started
        counts = read_counts(staging / STATS_FILE)
        unique = int(counts.get("unique_texts", 0))
        encoded = int(counts.get("texts_encoded", 0))
        rows = int(counts.get("rows_written", 0))
        reused = int(counts.get(embed_reuse.TEXTS_REUSED, 0))
        collisions = int(counts.get("text_id_collisions", 0))
        if collisions == 0:
            (staging / COLLISIONS_FILE).unlink(missing_ok=True)
        else:  # each is a dead letter that names both texts; their rows get no embedding
            LOG.warning(
                "%d text id(s) shared by different texts, not embedded: %s", collisions, out / COLLISIONS_FILE
            )
        if unique + collisions == 0:
            raise UserError(f"{data / IMPRESSIONS} holds no query or ad texts; nothing to embed")
        if not unique == encoded + reused == rows:
            # A bug (a lost or repeated forward), never the user's: refuse to publish.
            raise RuntimeError(f"embed counts disagree: {counts}")
        manifest = {
            "encoder_version": config.version,
            "slug": config.slug,
            "dim": config.source.width,
            "encoder": config.fields(),  # what rebuilds the encoder (request-time vectors)
            "rows": rows,
            "text_id_collisions": collisions,
            "source": str(data / IMPRESSIONS),
            "nlpctr_version": __version__,
            "device": device,
            **embed_reuse.reuse_manifest(counts, stored),
        }
        write_json(staging / EMBEDDINGS_MANIFEST, manifest)
    return embed_summary(request, device, out, counts, wall)


def embed_summary(
    request: EmbedRequest, device: str, out: Path, counts: dict[str, float], wall: float
) -> EmbedSummary:
    """The run's summary from the counts its pipeline summed."""
    unique, encoded = int(counts.get("unique_texts", 0)), int(counts.get("texts_encoded", 0))
    reused = int(counts.get(embed_reuse.TEXTS_REUSED, 0))
    rows, collisions = int(counts.get("rows_written", 0)), int(counts.get("text_id_collisions", 0))
    slots = counts.get("token_slots", 0)
    forward_seconds = counts.get("forward_seconds", 0.0)
    forward_passes = int(counts.get("forward_passes", 0))
    padding_ratio = (1.0 - counts.get("real_tokens", 0) / slots) if slots else 0.0
    texts_per_second = unique / wall if wall > 0 else 0.0
    summary = (
        f"embedded {unique} unique texts ({encoded} encoded, {reused} reused) "
        f"in {forward_passes} forward passes "
        f"(padding {padding_ratio:.1%}) -> {rows} rows, {wall:.1f} s, "
        f"{texts_per_second:.0f} texts/s -> {out}"
        + (
            f"; {collisions} text id(s) shared by different texts, not embedded ({COLLISIONS_FILE})"
            if collisions
            else ""
        )
    )
    return EmbedSummary(
        encoder_version=request.encoder.version,
        out=str(out),
        unique_texts=unique,
        text_id_collisions=collisions,
        rows_written=rows,
        forward_passes=forward_passes,
        texts_encoded=encoded,
        texts_reused=reused,
        batch_size=request.batch_size,
        device=device,
        group_by_length=request.group_by_length,
        real_tokens=int(counts.get("real_tokens", 0)),
        token_slots=int(slots),
        padding_ratio=padding_ratio,
        wall_seconds=wall,
        texts_per_second=texts_per_second,
        forward_seconds=forward_seconds,
        forward_texts_per_second=encoded / forward_seconds if forward_seconds > 0 else 0.0,
        summary=summary,
    )
