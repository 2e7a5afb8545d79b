"""Historical CTR features per declared entity, from training rows only (Beam).

    nlpctr ctr-stats --data DIR [--prior-strength 10] [beam options]

ctr = (clicks + m * p0) / (impressions + m) per entity key over training rows, written as
`DIR/ctr_history/<entity>/` (entity level, online) and `DIR/ctr_history_rows/` (per row,
leave-one-out for training rows). Second job of docs/DESIGN.md, "Data flow"; timestamps and
leave-one-out: docs/USAGE.md, "CTR history features" and docs/DESIGN.md, "Modules in detail",
ctr_stats.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypedDict

import apache_beam as beam
import pyarrow as pa
from apache_beam.options.pipeline_options import PipelineOptions

from nlpctr import prepared
from nlpctr.atomic import JsonObject
from nlpctr.errors import UserError
from nlpctr.layout import CTR_HISTORY, CTR_HISTORY_ROWS, CTR_META, IMPRESSIONS, Manifest
from nlpctr.models.schema import SPLITS, ImpressionRow
from nlpctr.pipelines.flags import request_from_args
from nlpctr.pipelines.loopback import run_to_completion
from nlpctr.pipelines.outputs import staged_output

TRAIN = SPLITS[0]
JOB = "ctr-stats"


def smoothed_ctr(clicks: float, impressions: float, prior_ctr: float, prior_strength: float) -> float:
    """CTR shrunk toward the prior by `prior_strength` pseudo-impressions."""
    return (clicks + prior_strength * prior_ctr) / (impressions + prior_strength)


def entity_schema(entity: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field(entity, pa.string(), nullable=False),
            pa.field("event_timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field(f"{entity}_impressions", pa.int64(), nullable=False),
            pa.field(f"{entity}_clicks", pa.int64(), nullable=False),
            pa.field(f"{entity}_ctr", pa.float64(), nullable=False),
        ]
    )


# A row of ctr_history/<entity>/: the key under the entity's name, then `<entity>_impressions`,
# `_clicks` and `_ctr` (entity_schema); every column is named by the entity.
EntityHistoryRow = dict[str, str | int | float | dt.datetime]


class CtrHistoryRow(TypedDict):
    """A row of ctr_history_rows/ (row_schema; tests/test_records.py keeps the two equal): the
    impression, then per entity `<entity>_ctr` (float) and `<entity>_impressions` (int) beside it."""

    impression_id: str
    event_timestamp: dt.datetime


def row_schema(entities: Iterable[str]) -> pa.Schema:
    fields = [
        pa.field("impression_id", pa.string(), nullable=False),
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
    for entity in entities:
        fields.append(pa.field(f"{entity}_ctr", pa.float64(), nullable=False))
        fields.append(pa.field(f"{entity}_impressions", pa.int64(), nullable=False))
    return pa.schema(fields)


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    impressions = clicks = 0
    for i, c in pairs:
        impressions += i
        clicks += c
    return impressions, clicks


class EntityTotals(beam.PTransform):
    """Training rows -> (entity key, (impressions, clicks)); null keys have no history."""

    def __init__(self, entity: str) -> None:
        super().__init__()
        self.entity = entity

    def expand(self, train_rows: beam.pvalue.PCollection) -> beam.pvalue.PCollection:
        entity = self.entity
        return (
            train_rows
            | "Key"
            >> beam.FlatMap(
                lambda r: [(r[entity], (r["impressions"], r["clicks"]))] if r[entity] is not None else []
            )
            | "Sum" >> beam.CombinePerKey(_sum_pairs)
        )


def _entity_row(
    key_and_totals: tuple[str, tuple[int, int]],
    entity: str,
    snapshot: dt.datetime,
    prior: dict[str, float],
    prior_strength: float,
) -> EntityHistoryRow:
    key, (impressions, clicks) = key_and_totals
    return {
        entity: key,
        "event_timestamp": snapshot,
        f"{entity}_impressions": impressions,
        f"{entity}_clicks": clicks,
        f"{entity}_ctr": smoothed_ctr(clicks, impressions, prior["ctr"], prior_strength),
    }


def _row_history(
    row: ImpressionRow,
    entities: tuple[str, ...],
    prior: dict[str, float],
    prior_strength: float,
    *totals_by_entity: dict[str, tuple[int, int]],
) -> CtrHistoryRow:
    """One impression's CTR history: per entity, the smoothed CTR and count of the entity's
    training totals, leave-one-out for a training row (its own impressions and clicks are
    subtracted, so it never sees its own label)."""
    history: CtrHistoryRow = {
        "impression_id": row["impression_id"],
        "event_timestamp": row["event_timestamp"],
    }
    for entity, totals in zip(entities, totals_by_entity, strict=True):
        key = row[entity]
        # A null key has no history (EntityTotals skips it), so there is nothing to leave out;
        # a key never seen in training has totals (0, 0): both get the prior and count 0.
        impressions, clicks = totals.get(key, (0, 0)) if key is not None else (0, 0)
        if key is not None and row["split"] == TRAIN:
            impressions, clicks = impressions - row["impressions"], clicks - row["clicks"]
        history[f"{entity}_ctr"] = smoothed_ctr(clicks, impressions, prior["ctr"], prior_strength)
        history[f"{entity}_impressions"] = impressions
    return history


class ComputeCtrHistory(beam.PTransform):
    """{"for_totals": rows, "rows": rows} -> {"prior": the global training CTR (a singleton),
    "snapshot": the earliest event_timestamp, "entity:<e>": one row per key of entity e,
    "rows": each impression's (leave-one-out) history}.

    The rows come in twice (the same rows: two reads of the impressions): the totals are
    computed from the first, and the second streams past them as side inputs, so no row waits
    in a shuffle.
    """

    def __init__(self, entities: tuple[str, ...], prior_strength: float) -> None:
        super().__init__()
        self.entities, self.prior_strength = entities, prior_strength

    def expand(self, inputs: dict[str, beam.pvalue.PCollection]) -> dict[str, beam.pvalue.PCollection]:
        rows = inputs["for_totals"]
        train = rows | "TrainOnly" >> beam.Filter(lambda r: r["split"] == TRAIN)
        prior = (
            train
            | "TrainTotals" >> beam.Map(lambda r: (r["impressions"], r["clicks"]))
            | "GlobalSum" >> beam.CombineGlobally(_sum_pairs)
            | "Prior" >> beam.Map(lambda t: {"impressions": t[0], "clicks": t[1], "ctr": t[1] / max(t[0], 1)})
        )
        snapshot = (
            rows
            | "Stamps" >> beam.Map(lambda r: r["event_timestamp"])
            | "Snapshot" >> beam.CombineGlobally(min)
        )
        outputs = {"prior": prior, "snapshot": snapshot}
        totals_by_entity = []
        for entity in self.entities:
            totals = train | f"Totals[{entity}]" >> EntityTotals(entity)
            totals_by_entity.append(beam.pvalue.AsDict(totals))
            outputs[f"entity:{entity}"] = totals | f"Format[{entity}]" >> beam.Map(
                _entity_row,
                entity,
                beam.pvalue.AsSingleton(snapshot),
                beam.pvalue.AsSingleton(prior),
                self.prior_strength,
            )
        outputs["rows"] = inputs["rows"] | "RowHistory" >> beam.Map(
            _row_history,
            self.entities,
            beam.pvalue.AsSingleton(prior),
            self.prior_strength,
            *totals_by_entity,
        )
        return outputs


class CtrHistory(beam.PTransform):
    """Impression rows -> entity-level and row-level (leave-one-out) CTR history, written
    under `out` (`ctr_history/<entity>/`, `ctr_history_rows/`, and the meta file)."""

    def __init__(
        self,
        read_rows: Callable[[], beam.PTransform],
        entities: tuple[str, ...],
        prior_strength: float,
        out: Path,
    ) -> None:
        super().__init__()
        self.read_rows = read_rows
        self.entities, self.prior_strength, self.out = entities, prior_strength, out

    def expand(self, pbegin: beam.pvalue.PBegin) -> beam.pvalue.PCollection:
        history = {
            "for_totals": pbegin | "ReadForTotals" >> self.read_rows(),
            "rows": pbegin | "ReadRows" >> self.read_rows(),
        } | "Compute" >> ComputeCtrHistory(self.entities, self.prior_strength)
        for entity in self.entities:
            _ = history[f"entity:{entity}"] | f"Write[{entity}]" >> beam.io.WriteToParquet(
                str(self.out / CTR_HISTORY / entity / "part"),
                entity_schema(entity),
                file_name_suffix=".parquet",
            )
        _ = history["rows"] | "WriteRows" >> beam.io.WriteToParquet(
            str(self.out / CTR_HISTORY_ROWS / "part"), row_schema(self.entities), file_name_suffix=".parquet"
        )
        meta = (
            history["prior"]
            | "Meta"
            >> beam.Map(
                lambda p, snap: json.dumps(
                    {
                        "entities": list(self.entities),
                        "prior_strength": self.prior_strength,
                        "global_ctr": p["ctr"],
                        "train_impressions": p["impressions"],
                        "train_clicks": p["clicks"],
                        "snapshot_timestamp": snap.isoformat(),
                    },
                    sort_keys=True,
                ),
                beam.pvalue.AsSingleton(history["snapshot"]),
            )
            | "WriteMeta"
            >> beam.io.WriteToText(str(self.out / CTR_HISTORY / CTR_META), shard_name_template="")
        )
        return meta


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="nlpctr ctr-stats", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="a prepared dataset folder")
    parser.add_argument(
        "--prior-strength", type=float, default=10.0, help="pseudo-impressions of the global CTR (default 10)"
    )
    return parser.parse_known_args(argv)


@dataclass(frozen=True)
class CtrStatsRequest:
    """One `nlpctr ctr-stats` run.

    Raises:
        UserError: a prior strength that is not a positive finite number (NaN or infinity would
            make every CTR feature NaN, or the prior, and training would report metrics on them).
    """

    data: Path  # a prepared dataset folder
    prior_strength: float = 10.0  # pseudo-impressions of the global training CTR
    beam: tuple[str, ...] = ()  # Beam pipeline options

    def __post_init__(self) -> None:
        if not (math.isfinite(self.prior_strength) and self.prior_strength > 0):
            raise UserError(
                "--prior-strength must be a positive finite number of pseudo-impressions, "
                f"got {self.prior_strength}"
            )


@dataclass(frozen=True)
class CtrStatsSummary:
    """What a ctr-stats run wrote: its meta file's values (`ctr_history/_meta.json`), timed."""

    entities: tuple[str, ...]
    prior_strength: float
    global_ctr: float  # the CTR of the training rows, what a never-seen key gets
    train_impressions: int
    train_clicks: int
    snapshot_timestamp: str  # ISO-8601: the earliest impression, every entity row's stamp
    wall_seconds: float
    summary: str

    def to_dict(self) -> JsonObject:
        return {**asdict(self), "entities": list(self.entities)}


def run(argv: list[str] | None = None, test_pipeline: beam.Pipeline | None = None) -> JsonObject:
    """`nlpctr ctr-stats`: the flags as a `CtrStatsRequest` to `ctr_stats`; returns its meta and a
    `summary` line. `test_pipeline` (a `TestPipeline`) replaces the pipeline built from the Beam
    options, as in Beam's own examples."""
    args, beam_args = parse_args(argv)
    request = request_from_args(CtrStatsRequest, args, beam=tuple(beam_args))
    return ctr_stats(request, test_pipeline).to_dict()


def ctr_stats(request: CtrStatsRequest, test_pipeline: beam.Pipeline | None = None) -> CtrStatsSummary:
    """CTR history per entity of a prepared folder, from its training rows only.

    Args:
        request: the folder and the prior's strength.
        test_pipeline: replaces the pipeline built from `request.beam` (tests).

    Returns:
        The meta file's values and a one-line summary.

    Raises:
        UserError: the folder is not prepared, a damaged file (named with its fix), or an output
            folder that is not the job's to replace.
    """
    data_dir = Path(request.data).resolve()
    manifest = Manifest.read(data_dir)
    with prepared.reading(data_dir, [IMPRESSIONS]):  # a damaged file named, with its fix
        return _ctr_stats(request, data_dir, manifest, test_pipeline)


def _ctr_stats(
    request: CtrStatsRequest, data_dir: Path, manifest: Manifest, test_pipeline: beam.Pipeline | None
) -> CtrStatsSummary:
    entities = manifest.entities
    columns = ["impression_id", "event_timestamp", "split", "impressions", "clicks", *entities]
    # Before any work: each output is new, empty or this job's earlier output; both are swapped
    # in together, so a crash before that leaves the old ones untouched.
    outputs = (CTR_HISTORY, CTR_HISTORY_ROWS)
    with staged_output(
        data_dir, JOB, flag="--data", claim_flag=f"--data {data_dir}:", parts=outputs
    ) as staging:
        started = time.perf_counter()
        pattern = str(data_dir / IMPRESSIONS / "*.parquet")
        pipeline = (
            test_pipeline
            if test_pipeline is not None
            else beam.Pipeline(options=PipelineOptions(list(request.beam)))
        )
        _ = pipeline | "CtrHistory" >> CtrHistory(
            lambda: beam.io.ReadFromParquet(pattern, columns=columns),
            entities,
            request.prior_strength,
            staging,
        )
        run_to_completion(pipeline)
    meta = json.loads((data_dir / CTR_HISTORY / CTR_META).read_text())
    wall = time.perf_counter() - started
    summary = (
        f"ctr-stats {manifest.dataset}: {len(entities)} entities ({', '.join(entities)}), "
        f"global train CTR {meta['global_ctr']:.4f}, prior strength {request.prior_strength:g}; "
        f"{wall:.1f} s -> {data_dir / CTR_HISTORY}"
    )
    return CtrStatsSummary(
        entities=tuple(meta["entities"]),
        prior_strength=meta["prior_strength"],
        global_ctr=meta["global_ctr"],
        train_impressions=meta["train_impressions"],
        train_clicks=meta["train_clicks"],
        snapshot_timestamp=meta["snapshot_timestamp"],
        wall_seconds=round(wall, 3),
        summary=summary,
    )
