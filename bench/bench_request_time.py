"""Benchmark request-time vectors: online lookups of queries the store has never seen (a script,
not a test).

    .venv/bin/python bench/bench_request_time.py [--data DIR] [--repeats 30] [--torch-threads N]
                                                 [--out bench/results]

Without --data it prepares TREC 2013 in a temporary folder with the real jobs (data prepare,
ctr-stats, embed with the default encoder, MiniLM-L6 at 6 layers), applies the store (SQLite
online) and materialises it. Then it times `OnlineFeatures("cascade_frozen").get` on rows of real
impressions (ids, position, CTR keys) whose query is
  (a) a stored one, given by id (no encoder runs): the plain lookup;
  (b) a never-seen one, given as text: the lookup plus its vector computed by the encoder;
for 1 row and for 100 rows (100 different queries), fresh unseen texts every call, p50 and p95
over `--repeats` calls after one warm-up (the three called in turn, so that other work on the
cores weighs on each alike), plus the first call of a new `OnlineFeatures` (which
loads the encoder) and the encoder alone on the same texts (`TextEncoder.encode`). Writes
`request_time.json` and `request_time.md` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import torch

from nlpctr.features import store
from nlpctr.features.job_outputs import parquet_files
from nlpctr.layout import IMPRESSIONS
from nlpctr.models.encoder import EncoderConfig, TextEncoder

SIZES = (1, 100)


def prepare(root: Path) -> Path:
    """TREC 2013 through the real jobs, applied and materialised."""
    from nlpctr.pipelines import ctr_stats, embed_text, ingest

    data = root / "trec2013"
    ingest.run(["--dataset", "trec2013", "--out", str(data)])
    ctr_stats.run(["--data", str(data)])
    embed_text.run(["--data", str(data)])
    store.apply(data)
    store.materialize(data)
    return data


def unseen_texts(words: list[str], seed: int = 0) -> Iterator[str]:
    """Endless queries of 2-6 of the dataset's own words, each numbered: never in the store."""
    rng = np.random.default_rng(seed)
    for n in range(10**9):
        picked = rng.choice(words, size=int(rng.integers(2, 7)))
        yield f"{' '.join(picked)} {n}"


def timed(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """p50 and p95 of each function, called in turn (so that other work on the cores weighs on
    each alike), after one warm-up call each."""
    ms: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            ms[name].append((time.perf_counter() - started) * 1e3)
    return {
        name: {"p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95)), "calls": repeats}
        for name, v in ms.items()
    }


def run(data: Path, repeats: int) -> dict[str, Any]:
    table = pads.dataset(parquet_files(data / IMPRESSIONS), format="parquet").to_table()
    rows = [r for r in table.to_pylist() if r["query_text"]][:100]
    words = sorted({w for r in table.to_pylist() for w in (r["query_text"] or "").split() if w.isalpha()})
    texts = unseen_texts(words)
    online = store.OnlineFeatures(data, "cascade_frozen")
    keys = online.keys
    column = next(p.column for p in online.request_time.projections if p.role == "query_text")

    def stored(n: int) -> Callable[[], Any]:
        batch = [{k: r[k] for k in keys} for r in rows[:n]]
        return lambda: online.get(batch)

    def unseen(n: int) -> Callable[[], Any]:
        def call() -> Any:
            batch = [
                {**{k: r[k] for k in keys if k != "query_text_id"}, "query_text": next(texts)}
                for r in rows[:n]
            ]
            got = online.get(batch)
            assert got.computed == {column: n} and got.null_counts[column] == 0, got.computed
            return got

        return call

    first_batch = [{**{k: rows[0][k] for k in keys if k != "query_text_id"}, "query_text": next(texts)}]
    started = time.perf_counter()
    fresh = store.OnlineFeatures(data, "cascade_frozen")
    opened = time.perf_counter()
    fresh.get(first_batch)
    first_call = {"open_ms": (opened - started) * 1e3, "first_get_ms": (time.perf_counter() - opened) * 1e3}
    encoder = TextEncoder(EncoderConfig())
    out: dict[str, Any] = {"first_call_with_encoder_load": first_call}
    for n in SIZES:
        fns = {
            "stored_query_by_id": stored(n),
            "unseen_query_by_text": unseen(n),
            "encoder_alone": lambda n=n: encoder.encode([next(texts) for _ in range(n)]),
        }
        out[f"{n}_rows"] = timed(fns, repeats)
    return out


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    load = machine["load_average_before_after"]
    lines = [
        "# Request-time vectors of unseen queries",
        "",
        f"`python bench/bench_request_time.py` ({results['dataset']}, {results['encoder_version']}, "
        f"{machine['cpus']} CPUs, torch threads {machine['torch_threads']}, 1-min load average "
        f"{load[0][0]:.1f} before and {load[1][0]:.1f} after; fresh unseen queries every call).",
        "",
        "| rows per lookup | stored query by id, p50 / p95 ms | unseen query as text, p50 / p95 ms "
        "| the encoder alone, p50 ms |",
        "|---|---|---|---|",
    ]
    for n in SIZES:
        r = results["lookups"][f"{n}_rows"]
        s, u, e = r["stored_query_by_id"], r["unseen_query_by_text"], r["encoder_alone"]
        lines.append(
            f"| {n} | {s['p50_ms']:.1f} / {s['p95_ms']:.1f} | {u['p50_ms']:.1f} / {u['p95_ms']:.1f} "
            f"| {e['p50_ms']:.1f} |"
        )
    first = results["lookups"]["first_call_with_encoder_load"]
    lines += [
        "",
        f"The first lookup that needs the encoder loads it: {first['first_get_ms']:.0f} ms "
        f"(opening the store before it: {first['open_ms']:.0f} ms).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="a prepared, embedded, materialised dataset")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--torch-threads", type=int, default=None, help="default: torch's (the cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_request_time_") as tmp:
        data = args.data or prepare(Path(tmp))
        lookups = run(data, args.repeats)
    results = {
        "dataset": "trec2013" if args.data is None else str(args.data.name),
        "encoder_version": EncoderConfig().version,
        "repeats": args.repeats,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_before_after": [load_before, os.getloadavg()],  # others' work on the cores
        },
        "lookups": lookups,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "request_time.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "request_time.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
