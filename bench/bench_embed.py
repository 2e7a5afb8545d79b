"""Benchmark the embedding job on the Upworthy headlines (a script, not a test).

    .venv/bin/python bench/bench_embed.py [--limit N] [--layers K] [--batch-size B]
        [--torch-threads T] [--repeats R] [--out runs/bench/bench_embed.json] [beam options]

In one run, on the same unique texts, the same batch size and the same torch threads:
  (a) the Beam job (`pipelines/embed_text.py`, DirectRunner unless beam options say otherwise)
      vs a plain transformers loop (AutoTokenizer + AutoModel + masked mean): throughput ratio;
  (b) length-grouped vs arrival-order batches, for both: padding waste and speedup;
  (c) the Beam job vs the loop a user would naively write over the impressions: every row's
      text in file order (duplicates included), tokenised with `padding="max_length"`, same
      model, batch size, threads and mean pooling; compared per impression row (rows/s), with
      the job timed around the whole `embed_text.run` call. Its vectors are checked against
      the job's for every row (max |diff| < 1e-4, or the script fails).
The Beam figure is end to end (pipeline start, model load, parquet read and write); the plain
and naive loops are timed from an already loaded, warmed-up model, so the ratios are conservative.
The five runs are interleaved `--repeats` times and the fastest of each is kept: on a shared
machine the fastest run is the one least disturbed by other processes. CPU seconds of this
process are recorded too (they cover the Beam job only with the in-process DirectRunner); with
`--torch-threads 1` they barely depend on what else the machine runs, so the CPU-seconds ratio
is the robust figure there, while wall-clock ratios swing with the machine's load.
Prints a table and writes a JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch
from transformers import AutoModel, AutoTokenizer

from nlpctr.layout import IMPRESSIONS
from nlpctr.models.encoder import EncoderConfig, model_path
from nlpctr.models.schema import impression_schema, text_id
from nlpctr.pipelines import embed_text
from nlpctr.pipelines.specs import data_root
from nlpctr.pipelines.unique_texts import TEXT_COLUMN_PAIRS, texts_of_table

UPWORTHY = data_root() / "upworthy" / "upworthy_exploratory.parquet"
TARGET_RATIO = 0.85
TARGET_RATIO_NAIVE = 1.2  # the job vs the naive per-row loop, rows per second
MAX_ABS_DIFF = 1e-4


def build_fixture(headlines: list[str], folder: Path) -> Path:
    """An impressions folder (canonical schema) with one ad impression per Upworthy row."""
    base = dt.datetime(2013, 1, 1, tzinfo=dt.UTC)
    n = len(headlines)
    columns: dict[str, Any] = {
        "impression_id": [str(i) for i in range(n)],
        "event_timestamp": [base + dt.timedelta(minutes=i) for i in range(n)],
        "query_id": [None] * n,
        "query_text": [None] * n,
        "ad_id": [text_id(h) for h in headlines],
        "ad_text": headlines,
        "ad_extra_text": [None] * n,
        "impressions": [1] * n,
        "clicks": [0] * n,
        "query_text_id": [None] * n,
        "ad_text_id": [text_id(h) for h in headlines],
        "split": ["train"] * n,
    }
    (folder / IMPRESSIONS).mkdir(parents=True)
    pq.write_table(pa.table(columns, schema=impression_schema([])), folder / IMPRESSIONS / "part-0.parquet")
    return folder


def unique_texts(folder: Path) -> tuple[list[str], list[str]]:
    """(text ids, texts) the job encodes: its own dedup rule applied to the fixture."""
    table = pq.read_table(folder / IMPRESSIONS)
    pairs = sorted(texts_of_table(table))
    return [p[0] for p in pairs], [p[1].text for p in pairs]


def row_texts(folder: Path) -> tuple[list[str], list[str]]:
    """(text id, text) of every impression row in file order, duplicates included: the query
    text (when the row has one), then the ad text, as the job reads them."""
    table = pq.read_table(folder / IMPRESSIONS, columns=[c for pair in TEXT_COLUMN_PAIRS for c in pair])
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    ids, texts = [], []
    for i in range(table.num_rows):
        for id_column, text_column in TEXT_COLUMN_PAIRS:
            if columns[text_column][i] is not None:
                ids.append(columns[id_column][i])
                texts.append(columns[text_column][i])
    return ids, texts


def load_model(config: EncoderConfig) -> tuple[Any, Any]:
    """Tokenizer and encoder truncated to `config.layers`, loaded as a user would."""
    tokenizer = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    model = AutoModel.from_pretrained(model_path(), local_files_only=True).eval()
    model.encoder.layer = model.encoder.layer[: config.layers]
    model.config.num_hidden_layers = config.layers
    return tokenizer, model


def naive_loop(texts: list[str], rows: int, config: EncoderConfig, batch_size: int) -> dict:
    """The loop a user would write over the impressions: every row's text as it comes,
    padded to max_length, forward, masked mean. No dedup, no length grouping."""
    tokenizer, model = load_model(config)

    def encode(batch: list[str]) -> Any:
        return tokenizer(
            batch, padding="max_length", truncation=True, max_length=config.max_length, return_tensors="pt"
        )

    with torch.inference_mode():  # warm-up batch, not timed
        model(**encode(texts[:batch_size]))
    started, cpu = time.perf_counter(), time.process_time()
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    real = slots = passes = 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = encode(texts[start : start + batch_size])
            out[start : start + batch_size], used = mean_pooled(model, enc)
            real, slots, passes = real + used, slots + enc["attention_mask"].numel(), passes + 1
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        "rows": rows,
        "rows_per_second": rows / seconds,
        "texts_encoded": len(texts),
        "texts_per_second": len(texts) / seconds,
        "forward_passes": passes,
        "padding_ratio": 1 - real / slots,
        "embeddings": out,
    }


def mean_pooled(model: Any, enc: Any) -> tuple[np.ndarray, int]:
    """One forward pass: the masked mean of the last hidden states, and the real tokens in it."""
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)).numpy(), int(enc["attention_mask"].sum())


def plain_loop(texts: list[str], config: EncoderConfig, batch_size: int, sort_by_length: bool) -> dict:
    """A plain transformers loop: tokenise, pad per batch, forward, masked mean."""
    tokenizer, model = load_model(config)
    with torch.inference_mode():  # warm-up batch, not timed
        model(
            **tokenizer(
                texts[:batch_size],
                padding=True,
                truncation=True,
                max_length=config.max_length,
                return_tensors="pt",
            )
        )
    started, cpu = time.perf_counter(), time.process_time()
    lengths = [
        len(ids) for ids in tokenizer(texts, truncation=True, max_length=config.max_length)["input_ids"]
    ]
    order = sorted(range(len(texts)), key=lengths.__getitem__) if sort_by_length else list(range(len(texts)))
    out = np.empty((len(texts), model.config.hidden_size), dtype=np.float32)
    real = slots = passes = 0
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            enc = tokenizer(
                [texts[i] for i in rows],
                padding=True,
                truncation=True,
                max_length=config.max_length,
                return_tensors="pt",
            )
            out[rows], used = mean_pooled(model, enc)
            real, slots, passes = real + used, slots + enc["attention_mask"].numel(), passes + 1
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu_seconds": time.process_time() - cpu,
        "texts_per_second": len(texts) / seconds,
        "forward_passes": passes,
        "padding_ratio": 1 - real / slots,
        "embeddings": out,
    }


def beam_job(folder: Path, args: argparse.Namespace, beam_args: list[str], group_by_length: bool) -> dict:
    """Run the embedding job on the fixture; returns its summary plus the embeddings by text id."""
    argv = [
        "--data",
        str(folder),
        "--layers",
        str(args.layers),
        "--batch-size",
        str(args.batch_size),
        "--torch-threads",
        str(args.torch_threads),
        *beam_args,
    ]
    if not group_by_length:
        argv.append("--no-length-grouping")
    cpu, started = time.process_time(), time.perf_counter()
    summary = embed_text.run(argv)
    # The whole call (argument checks, output claim, publish too): the per-row comparison's time.
    summary["run_seconds"] = time.perf_counter() - started
    summary["cpu_seconds"] = time.process_time() - cpu
    summary["seconds"] = summary["wall_seconds"]
    table = pads.dataset(summary["out"], format="parquet").to_table().sort_by("text_id")
    summary["embeddings"] = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    summary["text_ids"] = table.column("text_id").to_pylist()
    return summary


def print_table(table: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="first N distinct headlines only")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; the fastest is kept")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_embed.json"))
    args, beam_args = parser.parse_known_args(argv)
    torch.set_num_threads(args.torch_threads)
    config = EncoderConfig(layers=args.layers)

    rows = pq.read_table(UPWORTHY, columns=["headline"]).column("headline").to_pylist()
    distinct = list(dict.fromkeys(h for h in rows if h))
    if args.limit:
        keep = set(distinct[: args.limit])
        rows = [h for h in rows if h in keep]
        distinct = distinct[: args.limit]

    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        folder = build_fixture([h for h in rows if h], Path(tmp) / "data")
        ids, texts = unique_texts(folder)
        row_ids, every_text = row_texts(folder)
        n_rows = pq.read_metadata(folder / IMPRESSIONS / "part-0.parquet").num_rows
        print(
            f"{len(rows)} impressions, {len(distinct)} distinct headlines, {len(ids)} unique text ids; "
            f"{config.version}, batch {args.batch_size}, torch threads {args.torch_threads}",
            flush=True,
        )
        tries: dict[str, list[dict]] = {
            "beam_grouped": [],
            "plain_grouped": [],
            "beam_arrival": [],
            "plain_arrival": [],
            "naive_rows": [],
        }
        for _ in range(max(1, args.repeats)):
            tries["beam_grouped"].append(beam_job(folder, args, beam_args, group_by_length=True))
            tries["plain_grouped"].append(plain_loop(texts, config, args.batch_size, sort_by_length=True))
            tries["beam_arrival"].append(beam_job(folder, args, beam_args, group_by_length=False))
            tries["plain_arrival"].append(plain_loop(texts, config, args.batch_size, sort_by_length=False))
            tries["naive_rows"].append(naive_loop(every_text, n_rows, config, args.batch_size))
            print("  " + ", ".join(f"{k} {v[-1]['seconds']:.1f} s" for k, v in tries.items()), flush=True)
        runs = {name: min(results, key=lambda r: r["seconds"]) for name, results in tries.items()}
        for name, results in tries.items():
            runs[name]["all_seconds"] = [r["seconds"] for r in results]

    if runs["beam_grouped"]["text_ids"] != ids:
        raise SystemExit("the Beam job wrote a different set of text ids than the fixture holds")
    max_diff = float(np.abs(runs["beam_grouped"]["embeddings"] - runs["plain_grouped"]["embeddings"]).max())
    # Each row's naive vector against the job's vector for that row's text id, on the rows whose
    # text is the one the job encoded for the id: a spelling that normalises alike (case,
    # spacing) shares the id and the job's vector by design, but is not the same text.
    position = {text_id: i for i, text_id in enumerate(ids)}
    at = np.array([position[t] for t in row_ids])
    same_text = np.array([every_text[i] == texts[at[i]] for i in range(len(row_ids))])
    per_row_diff = np.abs(runs["beam_grouped"]["embeddings"][at] - runs["naive_rows"]["embeddings"]).max(
        axis=1
    )
    naive_diff = float(per_row_diff[same_text].max())
    variant_diff = float(per_row_diff[~same_text].max()) if (~same_text).any() else 0.0
    if naive_diff >= MAX_ABS_DIFF:
        raise SystemExit(
            f"the naive loop's vectors differ from the job's by {naive_diff:.1e} >= {MAX_ABS_DIFF}"
        )
    job = runs["beam_grouped"]
    job_rows_per_second = n_rows / min(r["run_seconds"] for r in tries["beam_grouped"])

    def rate(name: str) -> float:
        return runs[name]["texts_per_second"]

    figures = {
        "ratio_beam_vs_plain": rate("beam_grouped") / rate("plain_grouped"),
        "ratio_beam_forward_vs_plain": runs["beam_grouped"]["forward_texts_per_second"]
        / rate("plain_grouped"),
        "speedup_grouped_beam": rate("beam_grouped") / rate("beam_arrival"),
        "speedup_grouped_plain": rate("plain_grouped") / rate("plain_arrival"),
        "cpu_ratio_beam_vs_plain": runs["plain_grouped"]["cpu_seconds"] / runs["beam_grouped"]["cpu_seconds"],
        "max_abs_diff_beam_vs_plain": max_diff,
        "target_ratio": TARGET_RATIO,
        "rows": n_rows,
        "job_rows_per_second": job_rows_per_second,
        "naive_rows_per_second": runs["naive_rows"]["rows_per_second"],
        "ratio_job_vs_naive_rows": job_rows_per_second / runs["naive_rows"]["rows_per_second"],
        "padding_job": job["padding_ratio"],
        "padding_naive": runs["naive_rows"]["padding_ratio"],
        "max_abs_diff_job_vs_naive": naive_diff,
        "rows_compared_job_vs_naive": int(same_text.sum()),
        "rows_with_variant_spelling": int((~same_text).sum()),
        "max_abs_diff_variant_spelling": variant_diff,
        "target_ratio_naive": TARGET_RATIO_NAIVE,
    }
    table = [
        ("run", "seconds", "cpu s", "texts/s", "forward passes", "padding"),
        *[
            (
                name,
                f"{r['seconds']:.1f}",
                f"{r['cpu_seconds']:.1f}",
                f"{r['texts_per_second']:.0f}",
                str(r["forward_passes"]),
                f"{r['padding_ratio']:.1%}",
            )
            for name, r in runs.items()
            if name != "naive_rows"
        ],
    ]
    print_table(table)
    print(f"per impression row ({n_rows} rows in file order, duplicates included):")
    print_table(
        [
            ("run", "seconds", "rows/s", "texts encoded", "forward passes", "padding"),
            (
                "beam_grouped (whole run)",
                f"{n_rows / job_rows_per_second:.1f}",
                f"{job_rows_per_second:.0f}",
                str(job["texts_encoded"]),
                str(job["forward_passes"]),
                f"{job['padding_ratio']:.1%}",
            ),
            (
                "naive_rows (max_length)",
                f"{runs['naive_rows']['seconds']:.1f}",
                f"{runs['naive_rows']['rows_per_second']:.0f}",
                str(runs["naive_rows"]["texts_encoded"]),
                str(runs["naive_rows"]["forward_passes"]),
                f"{runs['naive_rows']['padding_ratio']:.1%}",
            ),
        ]
    )
    print(
        f"beam/plain throughput ratio {figures['ratio_beam_vs_plain']:.2f} end to end "
        f"({figures['ratio_beam_forward_vs_plain']:.2f} forward-only, "
        f"{figures['cpu_ratio_beam_vs_plain']:.2f} by CPU seconds; target >= {TARGET_RATIO}); "
        f"length grouping speedup: beam x{figures['speedup_grouped_beam']:.2f}, "
        f"plain x{figures['speedup_grouped_plain']:.2f}; max |beam - plain| = {max_diff:.1e}"
    )
    print(
        f"job/naive rows per second {figures['ratio_job_vs_naive_rows']:.2f} "
        f"(target >= {TARGET_RATIO_NAIVE}); max |job - naive| = {naive_diff:.1e} over the "
        f"{int(same_text.sum())} rows whose text the job encoded ({variant_diff:.1e} over the "
        f"{int((~same_text).sum())} rows of a variant spelling of it, which share its id and vector)"
    )

    report = {
        "encoder_version": config.version,
        "impressions": len(rows),
        "distinct_headlines": len(distinct),
        "unique_text_ids": len(ids),
        "batch_size": args.batch_size,
        "torch_threads": args.torch_threads,
        "beam_args": beam_args,
        "repeats": max(1, args.repeats),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "runs": {
            name: {k: v for k, v in r.items() if k not in ("embeddings", "text_ids", "summary")}
            for name, r in runs.items()
        },
        "figures": figures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
