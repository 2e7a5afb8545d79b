"""Benchmark the Feast store on ~12k 384-d text embeddings (a script, not a test).

    .venv/bin/python bench/bench_feast.py [--data DIR] [--lookups 300] [--no-redis]
        [--enrich-splits valid test] [--rounds 3] [--feast-batches 128 256 1024]
        [--parts materialize lookups handler enrichment ratio training_frame]
        [--out runs/bench/bench_feast.json] [--ratio-md bench/results/enrichment.md]

Without --data it prepares Upworthy (12,353 unique headlines) in a temporary folder, runs the
ctr-stats job, and writes random 384-d float32 vectors in the embed job's layout wherever the
embed job has not written any (Feast's costs do not depend on the values). Then, for SQLite and
for Redis (when redis-server is on PATH: started on a free loopback port, stopped at the end):
  (a) materialize: rows/s into the online store, for the embedding view alone and for all views;
  (b) online lookups of 1 and of 100 text ids, p50/p99 latency: Feast `get_online_features`
      beside a raw read of the same rows from the same store (one sqlite3 SELECT ... IN, or one
      pipelined Redis HMGET per key) with the same protobuf decoding, as a ratio;
  (c) the `cascade_frozen` service (every online view, ad and query text) for 1 and 100 rows;
  (d) Beam enrichment of the same impressions: Beam's stock per-element
      FeastFeatureStoreEnrichmentHandler vs the batched one, end to end (pipeline included) and
      handler-only (ms per row, no pipeline);
  (d') the goal's ratio, side by side on the same rows, interleaved over --rounds (medians):
      `score-batch` (batched) end to end against Feast's own batched call over the impressions
      (`get_online_features(features=<service>, entity_rows=<a batch's rows>).to_dict()`, at
      each of --feast-batches rows a call; the fastest is the reference), and the batched
      lookup alone (`OnlineFeatureLookup`, no pipeline), in ms per row; and where the job's
      time goes (enrichment_ratio.py);
  (e) (SQLite run) `training_frame` wall time over every impression (Feast's file offline store).
Prints a table and writes a JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from enrichment_ratio import (
    ratio_bench,
    ratio_lines,
    ratio_markdown,
)  # (bench/ is this script's folder: on sys.path)
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import _mmh3, _redis_key
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto

from nlpctr.features import store, store_config
from nlpctr.features.job_outputs import JobOutputs
from nlpctr.features.local_redis import LocalRedisServer
from nlpctr.features.names import embedding_view_name
from nlpctr.layout import IMPRESSIONS, embeddings_dir
from nlpctr.prepared import parquet_files

DIM = 384
# The measurements, (a) to (e) above; --parts picks some.
PARTS = ("materialize", "lookups", "handler", "enrichment", "ratio", "training_frame")


def prepare(root: Path) -> Path:
    """Upworthy, prepared, with its CTR history (the real job)."""
    from nlpctr.pipelines import ctr_stats, ingest

    data = root / "upworthy"
    ingest.run(["--dataset", "upworthy", "--out", str(data)])
    ctr_stats.run(["--data", str(data)])
    return data


def write_random_embeddings(data: Path, slug: str = "bench_random_384") -> None:
    """One random 384-d vector per unique text, in the embed job's layout."""
    rows = pads.dataset(parquet_files(data / IMPRESSIONS), format="parquet").to_table(
        columns=["ad_text_id", "query_text_id", "event_timestamp"]
    )
    frame = rows.to_pandas()
    ids = frame.melt(id_vars="event_timestamp", value_vars=["ad_text_id", "query_text_id"]).dropna()
    first = ids.groupby("value").event_timestamp.min()
    vectors = np.random.default_rng(0).standard_normal((len(first), DIM)).astype(np.float32)
    table = pa.table(
        {
            "text_id": pa.array(first.index.to_list(), pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), DIM).cast(
                pa.list_(pa.float32())
            ),
            "encoder_version": pa.array(["random-normal-384 (benchmark)"] * len(first)),
            "event_timestamp": pa.array(first.to_list(), pa.timestamp("us", tz="UTC")),
        }
    )
    out = embeddings_dir(data, slug)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out / "part-00000-of-00001.parquet")


def percentiles(fn: Callable[[], Any], repeats: int, warmup: int = 10) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def entity_key(text_id: str) -> EntityKeyProto:
    return EntityKeyProto(join_keys=["text_id"], entity_values=[ValueProto(string_val=text_id)])


def decode(blob: bytes | None) -> Any:
    if blob is None:
        return None
    value = ValueProto()
    value.ParseFromString(blob)
    kind = value.WhichOneof("val")
    return list(value.float_list_val.val) if kind == "float_list_val" else getattr(value, kind or "null_val")


class RawSqlite:
    """The query Feast's SQLite store runs, without Feast: one SELECT ... IN, then decode."""

    def __init__(self, fs: Any, view: str) -> None:
        self.conn = sqlite3.connect(fs.config.online_store.path)
        self.table = f"{fs.config.project}_{view}"

    def read(self, text_ids: list[str]) -> list[Any]:
        keys = [serialize_entity_key(entity_key(t), entity_key_serialization_version=3) for t in text_ids]
        rows = self.conn.execute(
            f'SELECT entity_key, feature_name, value FROM "{self.table}" '
            f"WHERE entity_key IN ({','.join('?' * len(keys))})",
            keys,
        ).fetchall()
        return [decode(value) for _, _, value in rows]


class RawRedis:
    """The reads Feast's Redis store makes, without Feast: pipelined HMGET per key, then decode."""

    def __init__(self, fs: Any, view: str, features: list[str]) -> None:
        import redis

        host, port = fs.config.online_store.connection_string.split(",")[0].split(":")
        self.client = redis.Redis(host=host, port=int(port))
        self.project = fs.config.project
        self.fields = [_mmh3(f"{view}:{f}") for f in features] + [f"_ts:{view}".encode()]

    def read(self, text_ids: list[str]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for t in text_ids:
            pipe.hmget(_redis_key(self.project, entity_key(t), 3), self.fields)
        return [decode(v) for values in pipe.execute() for v in values[:-1]]


def lookup_bench(data: Path, raw: Any, lookups: int, rng: np.random.Generator) -> dict[str, Any]:
    """Feast vs raw reads of the same text ids, 1 and 100 at a time; and the full service."""
    fs = store.open_store(data)
    layout = JobOutputs.discover(data)
    view = embedding_view_name(layout.embeddings[0].slug)
    texts = pads.dataset(parquet_files(layout.embeddings[0].path)).to_table(columns=["text_id"])
    text_ids = texts["text_id"].to_pylist()
    features = [f"{view}:embedding", f"{view}:encoder_version"]
    out: dict[str, Any] = {}
    for n in (1, 100):

        def pick(n: int = n) -> list[str]:
            return [text_ids[i] for i in rng.choice(len(text_ids), n, replace=False)]

        def feast_read(n: int = n) -> Any:
            return fs.get_online_features(
                features=features, entity_rows=[{"text_id": t} for t in pick(n)]
            ).to_dict()

        def raw_read(n: int = n) -> Any:
            return raw.read(pick(n))

        sample = pick(3)
        got = fs.get_online_features(
            features=features, entity_rows=[{"text_id": t} for t in sample]
        ).to_dict()
        assert got["embedding"][0] is not None and len(got["embedding"][0]) == DIM, "store not materialised"
        feast_t = percentiles(feast_read, lookups)
        raw_t = percentiles(raw_read, lookups)
        out[f"{n}_entities"] = {
            "feast": feast_t,
            "raw": raw_t,
            "ratio_p50": feast_t["p50_ms"] / raw_t["p50_ms"],
            "ratio_p99": feast_t["p99_ms"] / raw_t["p99_ms"],
        }
    online = store.OnlineFeatures(data, "cascade_frozen")
    impressions = pads.dataset(parquet_files(data / IMPRESSIONS)).to_table(columns=online.keys).to_pylist()
    for n in (1, 100):

        def service_read(n: int = n) -> Any:
            return online.get([impressions[i] for i in rng.choice(len(impressions), n, replace=False)])

        out[f"cascade_frozen_{n}_rows"] = percentiles(service_read, lookups)
    return out


def handler_bench(data: Path, rows: int = 2000, batch_size: int = 1024) -> dict[str, float]:
    """The two lookups without a pipeline, ms per row: Beam's stock Feast handler called per row
    vs `OnlineFeatureLookup` called per Arrow batch of `batch_size` rows."""
    import apache_beam as beam

    from nlpctr.pipelines import score_transforms

    online = store.OnlineFeatures(data, "cascade_frozen")
    table = pads.dataset(parquet_files(data / IMPRESSIONS)).to_table().slice(0, rows)
    config = store_config.config_path(data)
    handler = score_transforms.per_element_handler(config, "cascade_frozen", online.keys)
    requests = [beam.Row(**{k: r[k] for k in online.keys}) for r in table.select(online.keys).to_pylist()]
    with handler:
        started = time.perf_counter()
        for request in requests:
            handler(request)
        per_element = (time.perf_counter() - started) * 1000 / len(requests)
    lookup = store.OnlineFeatureLookup(config, "cascade_frozen")
    lookup.open()
    started = time.perf_counter()
    for start in range(0, table.num_rows, batch_size):
        lookup(table.slice(start, batch_size))
    batched = (time.perf_counter() - started) * 1000 / table.num_rows
    return {
        "per-element_ms_per_row": per_element,
        "batched_ms_per_row": batched,
        "speedup": per_element / batched,
    }


def enrichment_bench(data: Path, splits: list[str] | None) -> dict[str, Any]:
    """`nlpctr score-batch` end to end (pipeline included) in each mode, side by side."""
    from nlpctr.pipelines import score_batch

    out: dict[str, Any] = {}
    for mode in score_batch.ENRICHMENT_MODES:
        result = score_batch.run(
            [
                *("--data", str(data), "--enrichment", mode),
                *(("--splits", *splits) if splits else ()),
                *("--out", str(data / f"enriched_bench_{mode}"), "--direct_num_workers", "1"),
            ]
        )
        out[mode] = {
            "rows": result["rows"],
            "seconds": result["wall_seconds"],
            "rows_per_s": result["rows_per_second"],
        }
    out["speedup"] = out["batched"]["rows_per_s"] / out["per-element"]["rows_per_s"]
    return out


def materialize_bench(data: Path) -> dict[str, Any]:
    """Embedding view alone (fresh online store), then every view (the CLI's full materialize)."""
    fs = store.open_store(data)
    layout = JobOutputs.discover(data)
    view = embedding_view_name(layout.embeddings[0].slug)
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in parquet_files(layout.embeddings[0].path))
    started = time.perf_counter()
    fs.materialize(datetime(1970, 1, 1, tzinfo=UTC), datetime.now(UTC), feature_views=[view])
    seconds = time.perf_counter() - started
    full = store.materialize(data)
    total = sum(full["source_rows"].values())
    return {
        "embedding_rows": rows,
        "embedding_seconds": seconds,
        "embedding_rows_per_s": rows / seconds,
        "all_views_rows": total,
        "all_views_seconds": full["seconds"],
        "all_views_rows_per_s": total / full["seconds"],
    }


def run_store(data: Path, online: str, args: argparse.Namespace, url: str | None) -> dict[str, Any]:
    applied = store.apply(data, store_config.StoreChoice(online=online, redis_url=url))
    result: dict[str, Any] = {"project": applied["project"]}
    parts = set(args.parts)
    if "materialize" in parts:
        result["materialize"] = materialize_bench(data)
    else:
        store.materialize(data)  # the lookups below need a materialised store all the same
    if "lookups" in parts:
        fs = store.open_store(data)
        view = embedding_view_name(JobOutputs.discover(data).embeddings[0].slug)
        features = ["embedding", "encoder_version"]
        raw = RawSqlite(fs, view) if online == "sqlite" else RawRedis(fs, view, features)
        result["lookups"] = lookup_bench(data, raw, args.lookups, np.random.default_rng(1))
    if "handler" in parts:
        result["handler"] = handler_bench(data)
    if "enrichment" in parts:
        result["enrichment"] = enrichment_bench(data, args.enrich_splits)
    if "ratio" in parts:
        result["ratio"] = ratio_bench(data, args.enrich_splits, args.rounds, args.feast_batches)
    if online == "sqlite" and "training_frame" in parts:
        started = time.perf_counter()
        frame = store.training_frame(data, "cascade_frozen")
        result["training_frame"] = {
            "rows": len(frame),
            "seconds": time.perf_counter() - started,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    return result


def store_lines(m: dict[str, Any], lookups: dict[str, Any]) -> list[str]:
    """The materialize and lookup parts, (a) to (c), as lines."""
    lines = []
    if m:
        lines.append(
            f"  materialize: {m['embedding_rows']} x {DIM}-d embeddings "
            f"{m['embedding_rows_per_s']:.0f} rows/s "
            f"({m['embedding_seconds']:.1f} s); all views {m['all_views_rows_per_s']:.0f} rows/s"
        )
    for n in (1, 100) if lookups else ():
        x = lookups[f"{n}_entities"]
        lines.append(
            f"  lookup {n:>3} text ids: feast p50 {x['feast']['p50_ms']:.2f} ms "
            f"p99 {x['feast']['p99_ms']:.2f} ms"
            f" | raw p50 {x['raw']['p50_ms']:.2f} ms p99 {x['raw']['p99_ms']:.2f} ms"
            f" | ratio p50 {x['ratio_p50']:.1f}x p99 {x['ratio_p99']:.1f}x"
        )
    for n in (1, 100) if lookups else ():
        x = lookups[f"cascade_frozen_{n}_rows"]
        lines.append(f"  cascade_frozen {n:>3} rows: p50 {x['p50_ms']:.2f} ms p99 {x['p99_ms']:.2f} ms")
    return lines


def enrichment_lines(h: dict[str, Any], e: dict[str, Any]) -> list[str]:
    """The handler and enrichment parts, (d), as lines."""
    lines = []
    if h:
        lines.append(
            f"  handler only: per-element {h['per-element_ms_per_row']:.2f} ms/row, batched "
            f"{h['batched_ms_per_row']:.3f} ms/row ({h['speedup']:.0f}x)"
        )
    if e:
        lines.append(
            f"  Beam enrichment ({e['batched']['rows']} rows, end to end): per-element "
            f"{e['per-element']['rows_per_s']:.0f} rows/s, batched {e['batched']['rows_per_s']:.0f} rows/s "
            f"({e['speedup']:.1f}x)"
        )
    return lines


def table(results: dict[str, Any]) -> str:
    lines = []
    for online, r in results["stores"].items():
        lines.append(f"[{online}]")
        lines += store_lines(r.get("materialize", {}), r.get("lookups", {}))
        lines += enrichment_lines(r.get("handler", {}), r.get("enrichment", {}))
        lines += ratio_lines(r["ratio"]) if "ratio" in r else []
        if "training_frame" in r:
            t = r["training_frame"]
            lines.append(
                f"  training_frame: {t['rows']} rows in {t['seconds']:.1f} s "
                f"(peak RSS {t['peak_rss_mb']:.0f} MB)"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="a prepared dataset (default: Upworthy, fresh)"
    )
    parser.add_argument("--lookups", type=int, default=300, help="timed lookups per configuration")
    parser.add_argument(
        "--enrich-splits", nargs="+", default=None, help="rows Beam enriches (default: every split)"
    )
    parser.add_argument("--no-redis", action="store_true", help="SQLite only")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the ratio (medians)")
    parser.add_argument(
        "--feast-batches",
        type=int,
        nargs="+",
        default=[128, 256, 1024],
        help="rows per Feast call (the fastest is the reference)",
    )
    parser.add_argument(
        "--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to measure (default: all)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_feast.json"))
    parser.add_argument(
        "--ratio-md", type=Path, default=None, help="also write the ratio's report here (SQLite)"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench_feast_"))
    try:
        data = args.data.resolve() if args.data else prepare(workdir)
        if not JobOutputs.discover(data).embeddings:
            write_random_embeddings(data)
        layout = JobOutputs.discover(data)
        results: dict[str, Any] = {
            "dataset": layout.dataset,
            "texts": sum(
                pq.ParquetFile(f).metadata.num_rows for f in parquet_files(layout.embeddings[0].path)
            ),
            "dim": layout.embeddings[0].dim,
            "machine": {
                "python": sys.version.split()[0],
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "load_average_start": os.getloadavg()[0],  # a shared machine: what else ran
            },
            "stores": {},
        }
        results["stores"]["sqlite"] = run_store(data, "sqlite", args, None)
        if not args.no_redis and shutil.which("redis-server"):
            server = LocalRedisServer(workdir)
            try:
                results["stores"]["redis"] = run_store(data, "redis", args, server.url)
            finally:
                server.stop()
        elif not args.no_redis:
            print("redis-server not on PATH: Redis skipped", file=sys.stderr)
        results["machine"]["load_average_end"] = os.getloadavg()[0]
        print(f"{results['dataset']}: {results['texts']} texts x {results['dim']}-d")
        print(table(results))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"-> {args.out}")
        if args.ratio_md and "ratio" in results["stores"]["sqlite"]:
            args.ratio_md.write_text(
                ratio_markdown(results["stores"]["sqlite"]["ratio"], results["machine"], "SQLite")
            )
            print(f"-> {args.ratio_md}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
