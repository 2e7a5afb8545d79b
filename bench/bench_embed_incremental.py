"""Benchmark incremental embedding: a full embed vs an incremental one after ~10% new texts.

    .venv/bin/python bench/bench_embed_incremental.py [--limit N] [--new-share F] [--layers K]
        [--batch-size B] [--repeats R] [--out bench/results/embed_incremental.json] [beam options]

On the Upworthy headlines (the first N distinct ones): a folder holds impressions of all but
a share F of them and is embedded (not timed). Then impressions of the other F (new texts)
and repeats of as many old ones are added, and on the same final data, in one run,
  (a) `nlpctr embed` of a fresh copy: every unique text encoded (what a rerun cost before);
  (b) `nlpctr embed` of the embedded folder: only the new texts encoded, the rest reused
      (`pipelines/embed_reuse.py`).
Both are timed around the whole `embed_text.run` call (pipeline start, model load, parquet read
and write). With `--repeats R` the pair runs R times, alternating which goes first, on fresh
copies, and the fastest of each is kept (on a shared machine the least disturbed run). Their
outputs are checked equal (ids and timestamps exactly, vectors within 5e-6, or the script
fails). Prints a line per run and writes a JSON and a Markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from nlpctr.layout import IMPRESSIONS
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.schema import impression_schema, text_id
from nlpctr.pipelines import embed_text
from nlpctr.pipelines.specs import data_root

UPWORTHY = data_root() / "upworthy" / "upworthy_exploratory.parquet"
MAX_ABS_DIFF = 5e-6  # tests/test_embed_reuse.py's ATOL (it says why it is not 0)
BASE = dt.datetime(2013, 1, 1, tzinfo=dt.UTC)


def write_impressions(folder: Path, name: str, headlines: list[str], start: dt.datetime) -> None:
    """One ad impression per headline, a minute apart from `start`, as impressions/<name>.parquet."""
    n = len(headlines)
    ids = [text_id(h) for h in headlines]
    columns: dict[str, Any] = {
        "impression_id": [f"{name}:{i}" for i in range(n)],
        "event_timestamp": [start + dt.timedelta(minutes=i) for i in range(n)],
        "query_id": [None] * n,
        "query_text": [None] * n,
        "ad_id": ids,
        "ad_text": headlines,
        "impressions": [1] * n,
        "clicks": [0] * n,
        "query_text_id": [None] * n,
        "ad_text_id": ids,
        "split": ["train"] * n,
    }
    (folder / IMPRESSIONS).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=impression_schema([])), folder / IMPRESSIONS / f"{name}.parquet")


def timed_embed(data: Path, args: argparse.Namespace, beam_args: list[str]) -> dict[str, Any]:
    argv = ["--data", str(data), "--layers", str(args.layers), "--batch-size", str(args.batch_size)]
    started, cpu = time.perf_counter(), time.process_time()
    summary = embed_text.run([*argv, *beam_args])
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu
    print(f"  {summary['summary']}", flush=True)
    return {**summary, "seconds": seconds, "cpu_seconds": cpu_seconds}


def read_sorted(folder: str) -> pa.Table:
    return pads.dataset(folder, format="parquet").to_table().sort_by("text_id")


def compare(full: dict[str, Any], incremental: dict[str, Any]) -> float:
    """Max |diff| of the two outputs' vectors; SystemExit when rows, ids or timestamps differ."""
    a, b = read_sorted(full["out"]), read_sorted(incremental["out"])
    for column in ("text_id", "encoder_version", "event_timestamp"):
        if not a.column(column).equals(b.column(column)):
            raise SystemExit(f"incremental and full outputs differ in {column}")
    va = np.asarray(a.column("embedding").to_pylist(), dtype=np.float32)
    vb = np.asarray(b.column("embedding").to_pylist(), dtype=np.float32)
    diff = float(np.abs(va - vb).max())
    if diff > MAX_ABS_DIFF:
        raise SystemExit(f"incremental vectors differ from the full run's by {diff:.2e} > {MAX_ABS_DIFF}")
    return diff


def run_pairs(headlines: list[str], args: argparse.Namespace, beam_args: list[str], tmp: Path) -> dict:
    """The embedded base folder, then `--repeats` (full, incremental) pairs on the final data."""
    split = len(headlines) - round(len(headlines) * args.new_share)
    old, new = headlines[:split], headlines[split:]
    repeats = old[:: max(1, len(old) // max(1, len(new)))][: len(new)]  # old texts shown again
    base = tmp / "base"
    write_impressions(base, "part-0", old, BASE)
    print(f"base: {len(old)} texts", flush=True)
    first = timed_embed(base, args, beam_args)
    write_impressions(base, "part-1", new + repeats, BASE + dt.timedelta(days=365))
    tries: dict[str, list[dict[str, Any]]] = {"full": [], "incremental": []}
    diffs = []
    for attempt in range(max(1, args.repeats)):
        order = ["full", "incremental"] if attempt % 2 == 0 else ["incremental", "full"]
        runs = {}
        for kind in order:
            folder = tmp / f"{kind}{attempt}"
            if kind == "full":  # a fresh copy of the final impressions: nothing to reuse
                shutil.copytree(base / IMPRESSIONS, folder / IMPRESSIONS)
            else:  # the embedded folder as the last run left it
                shutil.copytree(base, folder)
            print(f"{kind} (try {attempt + 1}):", flush=True)
            runs[kind] = timed_embed(folder, args, beam_args)
        diffs.append(compare(runs["full"], runs["incremental"]))
        for kind, result in runs.items():
            tries[kind].append(result)
    best = {kind: min(results, key=lambda r: r["seconds"]) for kind, results in tries.items()}
    return {
        "old_texts": len(old),
        "new_texts": len(new),
        "repeated_old_texts": len(repeats),
        "base_embed_seconds": first["seconds"],
        "runs": {
            kind: {
                **{k: best[kind][k] for k in FIELDS},
                "all_seconds": [r["seconds"] for r in tries[kind]],
            }
            for kind in tries
        },
        "max_abs_diff": max(diffs),
    }


FIELDS = ("seconds", "cpu_seconds", "unique_texts", "texts_encoded", "texts_reused", "forward_passes")


def markdown(result: dict[str, Any]) -> str:
    full, inc = result["runs"]["full"], result["runs"]["incremental"]
    lines = [
        "# Incremental embedding: full vs incremental after new texts",
        "",
        f"`python bench/bench_embed_incremental.py {' '.join(result['argv'])}` ({result['encoder']}, "
        f"batch {result['batch_size']}, {result['cpus']} CPUs, "
        f"1-min load average {result['load_before']:.1f} before; "
        f"fastest of {len(full['all_seconds'])} tries each).",
        "",
        f"Final data: {result['old_texts'] + result['new_texts']} distinct headlines "
        f"({full['unique_texts']} unique text ids), {result['new_texts']} of them new "
        f"({result['new_share']:.0%}), plus {result['repeated_old_texts']} old ones shown again.",
        "",
        "| run | wall s | CPU s (this process) | texts encoded | texts reused | forward passes |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in (("full", full), ("incremental", inc)):
        lines.append(
            f"| {name} | {run['seconds']:.1f} | {run['cpu_seconds']:.1f} | {run['texts_encoded']} | "
            f"{run['texts_reused']} | {run['forward_passes']} |"
        )
    lines += [
        "",
        f"Incremental / full wall time: {result['wall_ratio']:.2f} (full is {1 / result['wall_ratio']:.1f}x "
        f"the incremental run); texts encoded {inc['texts_encoded']} vs {full['texts_encoded']}. "
        f"Outputs equal: same ids and timestamps, vectors within {result['max_abs_diff']:.1e}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=6000, help="first N distinct headlines")
    parser.add_argument("--new-share", type=float, default=0.1, help="share of them that is new")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="(full, incremental) pairs; fastest kept")
    parser.add_argument("--out", type=Path, default=Path("bench/results/embed_incremental.json"))
    args, beam_args = parser.parse_known_args(argv)
    rows = pq.read_table(UPWORTHY, columns=["headline"]).column("headline").to_pylist()
    headlines = list(dict.fromkeys(h for h in rows if h))[: args.limit]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_embed_incremental_") as tmp:
        result = run_pairs(headlines, args, beam_args, Path(tmp))
    runs = result["runs"]
    result.update(
        argv=list(argv if argv is not None else sys.argv[1:]),
        encoder=EncoderConfig(layers=args.layers).version,
        batch_size=args.batch_size,
        new_share=args.new_share,
        cpus=os.cpu_count(),
        load_before=load_before,
        load_after=os.getloadavg()[0],
        python=platform.python_version(),
        wall_ratio=runs["incremental"]["seconds"] / runs["full"]["seconds"],
        encoded_ratio=runs["incremental"]["texts_encoded"] / runs["full"]["texts_encoded"],
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
