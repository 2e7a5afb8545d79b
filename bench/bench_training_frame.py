"""Wall time and peak RSS of a service's training frame: Feast's file store in memory
(`features.store.training_frame`) vs the DuckDB as-of join into parquet shards
(`features.store.write_training_shards`). One engine per process, so peak RSS is its own.

    python bench/bench_training_frame.py --data DIR --engine feast|duckdb [--service baseline]

Prints one JSON line: engine, service, rows, wall_s, peak_rss_mb.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq

from nlpctr.features import store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--engine", choices=("feast", "duckdb"), required=True)
    parser.add_argument("--service", default="baseline")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.engine == "feast":
        rows = len(store.training_frame(args.data, args.service))
    else:
        shutil.rmtree(store.training_shards_dir(args.data, args.service), ignore_errors=True)
        root = store.write_training_shards(args.data, args.service)
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in root.glob("*/*.parquet"))
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"engine": args.engine, "service": args.service, "rows": rows, "wall_s": round(wall, 1),
                      "peak_rss_mb": round(peak)}))  # fmt: skip


if __name__ == "__main__":
    main()
