"""Measure what one stored text embedding costs in Redis, through Feast, on a local redis-server.

    .venv/bin/python infra/measure_redis_memory.py [--dataset upworthy] [--out infra/redis_memory.json]

Prepares the dataset (real `data prepare`, `ctr-stats` and a 1-layer `embed`: the vectors are
384-d whatever the depth), starts redis-server on a free loopback port, applies the Feast repo
with the Redis online store, then materialises the text-embedding view alone and reads
`INFO memory` before and after: bytes per text key = used_memory delta / new keys. Also reports
Redis' own `MEMORY USAGE` of sampled keys and the payload (field + value bytes) of a key, so the
overhead per key is payload-free. Then materialises every other view the same way (CTR history
keys). The capacity plan (infra/CAPACITY.md) scales these figures.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from typing import Any

from nlpctr.features import store
from nlpctr.features.local_redis import LocalRedisServer
from nlpctr.features.names import embedding_view_name
from nlpctr.pipelines import ctr_stats, embed_text, ingest

SAMPLE_KEYS = 500


def used_memory(server: LocalRedisServer) -> int:
    return int(server.client.info("memory")["used_memory"])


def key_figures(server: LocalRedisServer, keys: list[bytes]) -> dict[str, float]:
    """Redis' MEMORY USAGE and the raw field+value bytes of sampled keys, averaged."""
    sample = random.Random(0).sample(keys, min(SAMPLE_KEYS, len(keys)))
    usage = [int(server.client.memory_usage(key, samples=0)) for key in sample]
    payload = [
        len(key) + sum(len(f) + len(v) for f, v in server.client.hgetall(key).items()) for key in sample
    ]
    fields = [server.client.hlen(key) for key in sample]
    return {
        "memory_usage_bytes_mean": sum(usage) / len(usage),
        "payload_bytes_mean": sum(payload) / len(payload),
        "fields_per_key_mean": sum(fields) / len(fields),
    }


def materialize_and_measure(server: LocalRedisServer, data: Path, views: list[str]) -> dict[str, Any]:
    before_keys = set(server.client.scan_iter(count=10_000))
    before = used_memory(server)
    store.materialize(data, views=views)
    after = used_memory(server)
    new_keys = [k for k in server.client.scan_iter(count=10_000) if k not in before_keys]
    rows = len(new_keys)
    return {
        "views": views,
        "new_keys": rows,
        "used_memory_delta_bytes": after - before,
        "bytes_per_key": (after - before) / rows if rows else None,
        **key_figures(server, new_keys),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="upworthy")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("redis_memory.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nlpctr-redis-mem-") as tmp:
        data = Path(tmp) / args.dataset
        ingest.run(["--dataset", args.dataset, "--out", str(data)])
        ctr_stats.run(["--data", str(data)])
        embedded = embed_text.run(["--data", str(data), "--layers", "1"])
        slug = Path(embedded["out"]).name
        server = LocalRedisServer(Path(tmp))
        try:
            store.apply(data, online="redis", redis_url=server.url)
            baseline = used_memory(server)
            embedding_view = embedding_view_name(slug)
            text = materialize_and_measure(server, data, [embedding_view])
            others = [v.name for v in store.open_store(data).list_feature_views() if v.name != embedding_view]
            rest = materialize_and_measure(server, data, others)
            info = server.client.info("memory")
            result = {
                "dataset": args.dataset,
                "redis_version": server.client.info("server")["redis_version"],
                "unique_texts_embedded": embedded["unique_texts"],
                "embedding_dim": 384,
                "used_memory_empty_bytes": baseline,
                "text_embedding_view": text,
                "other_views": rest,
                "used_memory_total_bytes": int(info["used_memory"]),
                "mem_fragmentation_ratio": float(info["mem_fragmentation_ratio"]),
            }
        finally:
            server.stop()
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
