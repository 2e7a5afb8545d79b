"""The goal's ratio, (d') of bench_feast.py: `score-batch` (batched) end to end against Feast's
own batched call over the same impressions, interleaved rounds, by wall and by CPU time, with
where the job's time goes (read, lookup, write, the rest: Beam). bench_feast.py runs it
(`--parts ratio`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from nlpctr.features import store, store_config
from nlpctr.features.store.online import CALL_KEYS
from nlpctr.layout import IMPRESSIONS
from nlpctr.prepared import parquet_files


def feast_batched(fs: Any, online: store.OnlineFeatures, table: pa.Table, batch: int) -> tuple[float, float]:
    """Feast's own batched call over every row of `table`, `batch` rows a call, as a caller who
    holds the rows in Arrow makes it (keys as Python strings, a null key as the unknown id); the
    values taken out with `to_dict()`. Returns (wall, CPU) ms per row."""
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, table.num_rows, batch):
        rows = table.slice(start, batch)
        entity_rows = {
            k: [store.MISSING_KEY if v is None else str(v) for v in rows[k].to_pylist()] for k in online.keys
        }
        fs.get_online_features(
            features=online.service, entity_rows=entity_rows, full_feature_names=True
        ).to_dict()
    return per_row(started, cpu, table.num_rows)


def per_row(started: float, cpu: float, rows: int) -> tuple[float, float]:
    """(wall, CPU) ms per row since `started` (perf_counter) and `cpu` (process_time)."""
    return (time.perf_counter() - started) * 1000 / rows, (time.process_time() - cpu) * 1000 / rows


def lookup_only(data: Path, table: pa.Table, batch: int) -> tuple[tuple[float, float], pa.Table]:
    """`OnlineFeatureLookup` over Arrow batches of `batch` rows, no pipeline: (wall, CPU) ms per
    row, and the enriched rows."""
    lookup = store.OnlineFeatureLookup(store_config.config_path(data), "cascade_frozen")
    lookup.open()
    started, cpu = time.perf_counter(), time.process_time()
    enriched = [lookup(table.slice(start, batch)) for start in range(0, table.num_rows, batch)]
    return per_row(started, cpu, table.num_rows), pa.concat_tables(enriched)


def feast_distinct_calls(data: Path, table: pa.Table) -> tuple[float, float]:
    """The Feast calls the lookup makes (each view's distinct keys, `CALL_KEYS` a call, taken
    out with `to_dict()`), alone: the floor of the lookup; (wall, CPU) ms per row of `table`."""
    lookup = store.OnlineFeatureLookup(store_config.config_path(data), "cascade_frozen")
    lookup.open()
    assert lookup.store is not None
    calls = []
    for read in lookup.reads:
        asked = [
            table.select(list(columns)).rename_columns(list(read.join_keys))
            for _, columns, _ in read.projections
        ]
        keys = pa.concat_tables(asked).group_by(list(read.join_keys)).aggregate([])
        for start in range(0, keys.num_rows, CALL_KEYS):
            chunk = keys.slice(start, CALL_KEYS)
            rows = {
                k: [store.MISSING_KEY if v is None else str(v) for v in chunk[k].to_pylist()]
                for k in chunk.column_names
            }
            calls.append(([f"{read.view}:{f}" for f in read.features], rows))
    started, cpu = time.perf_counter(), time.process_time()
    for features, rows in calls:
        lookup.store.get_online_features(
            features=features, entity_rows=rows, full_feature_names=True
        ).to_dict()
    return per_row(started, cpu, table.num_rows)


def read_and_write(
    data: Path, enriched: pa.Table, out: Path
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Reading the impressions and writing the enriched rows (uncompressed, as the job's
    `WriteToParquetBatched`) without Beam: (wall, CPU) ms per row of each."""
    started, cpu = time.perf_counter(), time.process_time()
    pads.dataset(parquet_files(data / IMPRESSIONS)).to_table()
    read = per_row(started, cpu, enriched.num_rows)
    started, cpu = time.perf_counter(), time.process_time()
    pq.write_table(enriched, out, compression="none")
    return read, per_row(started, cpu, enriched.num_rows)


def ratio_bench(
    data: Path, splits: list[str] | None, rounds: int, feast_batches: list[int]
) -> dict[str, Any]:
    """The goal's ratio: `score-batch` (batched) end to end per row over Feast's own batched
    call per row on the same rows, each measured `rounds` times, interleaved (medians), by wall
    time and by this process's CPU time (the machine is shared: CPU time is the steadier); and
    where the job's time goes (read, lookup, write, the rest: Beam)."""
    from nlpctr.pipelines import score_batch

    online = store.OnlineFeatures(data, "cascade_frozen")
    table = pads.dataset(parquet_files(data / IMPRESSIONS)).to_table()
    if splits:
        table = table.filter(pc.is_in(table["split"], value_set=pa.array(splits)))
    times: dict[str, dict[str, list[float]]] = {"wall": {}, "cpu": {}}

    def record(name: str, measured: tuple[float, float]) -> None:
        times["wall"].setdefault(name, []).append(measured[0])
        times["cpu"].setdefault(name, []).append(measured[1])

    for turn in range(rounds):
        for batch in feast_batches:
            record(f"feast_batch_{batch}", feast_batched(online.store, online, table, batch))
        record("feast_distinct_calls", feast_distinct_calls(data, table))
        measured, enriched = lookup_only(data, table, score_batch.BATCH_ROWS)
        record("lookup_only", measured)
        read, write = read_and_write(data, enriched, data / f"enriched_ratio_{turn}.parquet")
        record("read_only", read)
        record("write_only", write)
        result = score_batch.run(
            [
                *("--data", str(data), *(("--splits", *splits) if splits else ())),
                *("--out", str(data / f"enriched_ratio_{turn}"), "--direct_num_workers", "1"),
            ]
        )
        assert result["rows"] == table.num_rows
        rows = result["rows"]
        record(
            "enrichment_end_to_end",
            (result["wall_seconds"] * 1000 / rows, result["cpu_seconds"] * 1000 / rows),
        )
    out: dict[str, Any] = {"rows": table.num_rows, "rounds": rounds, "batch_rows": score_batch.BATCH_ROWS}
    for clock, measured in times.items():
        out[clock] = ratios(
            {name: float(np.median(values)) for name, values in measured.items()}, feast_batches
        )
        out[clock]["ms_per_row_each_round"] = measured
    return out


def ratios(medians: dict[str, float], feast_batches: list[int]) -> dict[str, Any]:
    """One clock's medians, the ratios to Feast's best batched call, and the job's breakdown."""
    feast = min(medians[f"feast_batch_{b}"] for b in feast_batches)
    parts = {k: medians[f"{k}_only"] for k in ("read", "lookup", "write")}
    return {
        "ms_per_row": medians,
        "feast_best_ms_per_row": feast,
        "ratio_end_to_end": medians["enrichment_end_to_end"] / feast,
        "ratio_lookup_only": medians["lookup_only"] / feast,
        "lookup_over_its_feast_calls": medians["lookup_only"] / medians["feast_distinct_calls"],
        "breakdown_ms_per_row": {
            **parts,
            "beam_and_rest": medians["enrichment_end_to_end"] - sum(parts.values()),
        },
    }


def ratio_lines(q: dict[str, Any]) -> list[str]:
    """The ratio by each clock, and the job's breakdown."""
    lines = []
    for clock in ("wall", "cpu"):
        c = q[clock]
        ms = c["ms_per_row"]
        feast = ", ".join(
            f"{k.removeprefix('feast_batch_')} rows {v:.3f}"
            for k, v in ms.items()
            if k.startswith("feast_batch_")
        )
        parts = ", ".join(f"{k} {v:.3f}" for k, v in c["breakdown_ms_per_row"].items())
        lines += [
            f"  ratio by {clock} ({q['rows']} rows, medians of {q['rounds']} interleaved rounds): "
            f"score-batch end to end {ms['enrichment_end_to_end']:.3f} ms/row, lookup alone "
            f"{ms['lookup_only']:.3f}, Feast's batched call ({feast}) -> ratio "
            f"{c['ratio_end_to_end']:.2f} (lookup alone {c['ratio_lookup_only']:.2f})",
            f"    the lookup's own Feast calls {ms['feast_distinct_calls']:.3f} ms/row (lookup / them "
            f"{c['lookup_over_its_feast_calls']:.2f}); end to end = {parts}",
        ]
    return lines


def ratio_markdown(q: dict[str, Any], machine: dict[str, Any], store_name: str) -> str:
    """The ratio as a short report: the side-by-side table by each clock, and the breakdown."""
    wall, cpu = q["wall"], q["cpu"]
    names = {
        **{
            k: f"Feast's batched call, {k.removeprefix('feast_batch_')} rows a call"
            for k in wall["ms_per_row"]
            if k.startswith("feast_batch_")
        },
        "feast_distinct_calls": "Feast's calls the lookup makes (distinct keys, `to_dict()`), alone",
        "lookup_only": "`OnlineFeatureLookup` alone (no pipeline)",
        "read_only": "reading the impressions alone",
        "write_only": "writing the enriched rows alone",
        "enrichment_end_to_end": "**`score-batch` end to end**",
    }
    lines = [
        f"# Batched enrichment against Feast's own batched call ({store_name}, {q['rows']:,} impressions)",
        "",
        f"`bench/bench_feast.py`, its ratio (d') (bench/enrichment_ratio.py): medians of {q['rounds']} "
        f"interleaved rounds, ms per impression; {machine['platform']}, {machine['cpus']} CPUs, "
        f"shared: load average {machine['load_average_start']:.1f} at the start and "
        f"{machine['load_average_end']:.1f} at the end, so the wall clock mostly measures waiting "
        "for a core and CPU time (this process's) is the steadier figure.",
        "",
        "| measured | wall ms/row | CPU ms/row |",
        "|---|---|---|",
    ]
    lines += [f"| {names[k]} | {v:.3f} | {cpu['ms_per_row'][k]:.3f} |" for k, v in wall["ms_per_row"].items()]
    lines += [
        "",
        "**Ratio, `score-batch` end to end over Feast's best batched call: "
        f"{wall['ratio_end_to_end']:.2f} by wall, {cpu['ratio_end_to_end']:.2f} by CPU** (goal ≤ 1.2); the "
        "lookup alone "
        f"{wall['ratio_lookup_only']:.2f} / {cpu['ratio_lookup_only']:.2f}, and "
        f"{wall['lookup_over_its_feast_calls']:.2f} / {cpu['lookup_over_its_feast_calls']:.2f} of the Feast "
        "calls it makes (it reads each view once per distinct key, and takes the values from the response's "
        "protos instead of `to_dict()`).",
        "",
        "Where the job's time goes, ms/row (the rest: Beam's pipeline build, start-up and per-step "
        "overhead, null counting, the staged output): "
        + "; ".join(
            f"{k} {wall['breakdown_ms_per_row'][k]:.3f} wall / {v:.3f} CPU"
            for k, v in cpu["breakdown_ms_per_row"].items()
        )
        + ".",
        "",
    ]
    return "\n".join(lines)
