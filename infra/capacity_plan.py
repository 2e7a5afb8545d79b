"""The capacity plan's arithmetic: measured per-stage costs scaled to a day's traffic.

    .venv/bin/python infra/capacity_plan.py [--scaling bench/results/scaling.json]
        [--redis infra/redis_memory.json] [--engines bench/results/training_frame.json]

Every input is either MEASURED (with the file or benchmark it comes from) or an ASSUMPTION
(labelled, with its basis). Costs per row from the scaling benchmark are marginal: the CPU
time between its two largest sizes divided by the rows between them, so each process's fixed
startup (imports, Feast registry, model load) does not inflate the per-row figure.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DAY_S = 86_400
# The point-in-time join's engines in bench/results/training_frame.json: whole frames in memory
# (Feast's DuckDB and Spark stores) and the bounded-memory shards of the streamed path.
JOIN_ENGINES = (
    ("feast-duckdb", "Feast's DuckDB store, frame in memory"),
    ("feast-spark", "Feast's Spark store, frame in memory"),
    ("asof-shards", "DuckDB as-of join into shards"),
    ("spark-shards", "Feast's Spark store into shards"),
)


@dataclass(frozen=True)
class Input:
    name: str
    value: float
    unit: str
    source: str  # "MEASURED: ..." or "ASSUMPTION: ..."


def marginal_cpu_per_row(scaling: dict[str, Any], stage: str) -> tuple[float, str] | None:
    """CPU seconds per extra row between the two largest sizes where the stage succeeded."""
    ok = [
        (s["rows"], s["stages"][stage]["cpu_s"])
        for s in scaling["sizes"]
        if s["stages"].get(stage, {}).get("status") == "ok"
    ]
    if len(ok) < 2:
        return None
    (n0, c0), (n1, c1) = ok[-2], ok[-1]
    return (c1 - c0) / (n1 - n0), f"MEASURED: bench/results/scaling.json, {stage}, {n0:,} -> {n1:,} rows"


def engine_costs(frames: dict[str, Any], engine: str) -> tuple[float, float, str] | None:
    """(marginal node-s per row, wall s at the smallest size, source) of a training-frame engine:
    wall time between the two largest sizes where it succeeded over the rows between them, on
    one node (the benchmark's machine, every core)."""
    ok = [(s["rows"], s["engines"][engine]["wall_s"]) for s in frames["sizes"]
          if s["engines"].get(engine, {}).get("status") == "ok"]  # fmt: skip
    if len(ok) < 2:
        return None
    (n0, w0), (n1, w1) = ok[-2], ok[-1]
    source = f"MEASURED: bench/results/training_frame.json, {engine}, {n0:,} -> {n1:,} rows"
    return (w1 - w0) / (n1 - n0), w0, source


def inputs(scaling: dict[str, Any], redis: dict[str, Any], frames: dict[str, Any]) -> dict[str, Input]:
    found: dict[str, Input] = {}

    def add(key: str, name: str, value: float, unit: str, source: str) -> None:
        found[key] = Input(name, value, unit, source)

    add("impressions", "impressions per day", 1e9, "rows/day", "ASSUMPTION: the planning target")
    add("texts", "unique texts per day", 50e6, "texts/day", "ASSUMPTION: the planning target")
    add("new_text_share", "share of the day's unique texts never embedded before", 1.0, "",
        "ASSUMPTION: worst case (a cold start); a rerun embeds only new texts (embed_reuse)")  # fmt: skip
    for key, stage in (("ingest", "prepare"), ("ctr", "ctr-stats"), ("e0_epoch", "train-e0")):
        per_row = marginal_cpu_per_row(scaling, stage)
        if per_row:
            value, source = per_row
            if stage == "train-e0":
                value /= scaling["config"]["e0_epochs"]
                source += f" / {scaling['config']['e0_epochs']} epoch(s) (point-in-time join included)"
            add(key, f"{stage} CPU per row", value * 1e3, "core-ms/row", source)
    add("ingest_1m", "ingest, 1M rows (closing note of issue 2)", 156 * 2 / 1e6 * 1e3, "core-ms/row",
        "MEASURED: 156 s wall on 2 cores for 1M rows (DirectRunner), upper bound 2 cores busy")  # fmt: skip
    add("embed_cpu", "frozen MiniLM-L6 (6 layers) on CPU", 2 / 305 * 1e3, "core-ms/text",
        "MEASURED: bench/bench_embed.py, 305 texts/s on 2 threads, batch 64, 32 tokens")  # fmt: skip
    add("embed_gpu", "frozen MiniLM-L6 on one GPU", 14_000, "texts/s",
        "ASSUMPTION (UNMEASURED here, no GPU): sentence-transformers' published speed for "
        "all-MiniLM-L6-v2 on one V100 (~14,200 sentences/s); no GPU run was possible")  # fmt: skip
    add("materialize", "Feast materialize into Redis", 3_000, "rows/s per process",
        "MEASURED: bench/bench_feast.py, 3,000-4,000 rows/s (12,353 x 384-d), lower end")  # fmt: skip
    add("joint_cpu", "joint training, 2-layer LM, batch 32", 2 / 150 * 1e3, "core-ms/row",
        "MEASURED: bench/bench_joint.py, 150 rows/s on 2 cores")  # fmt: skip
    add("joint_gpu_speedup", "joint training GPU vs 2 CPU cores", 50, "x",
        "ASSUMPTION (UNMEASURED): one GPU = 50x two CPU cores for a 2-layer MiniLM at batch 32")  # fmt: skip
    add("lookup", "online lookup, 1 id, Redis p50", 0.3, "ms", "MEASURED: bench/bench_feast.py")
    add("lookups_per_impression", "online calls per scored impression", 1, "calls",
        "ASSUMPTION: one batched get_online_features call per impression (its ad and query)")  # fmt: skip
    add("peak_to_mean", "peak / mean traffic", 3, "x", "ASSUMPTION: a daily traffic peak")
    text = redis["text_embedding_view"]
    add("redis_text_key", "Redis bytes per text embedding key (through Feast)", text["bytes_per_key"],
        "bytes/key", f"MEASURED: infra/redis_memory.json ({text['new_keys']:,} keys)")  # fmt: skip
    add("redis_text_payload", "of which field+value payload", text["payload_bytes_mean"], "bytes/key",
        "MEASURED: infra/redis_memory.json (HGETALL of sampled keys)")  # fmt: skip
    other = redis["other_views"]
    add("redis_other_key", "Redis bytes per CTR-history/other key", other["bytes_per_key"], "bytes/key",
        f"MEASURED: infra/redis_memory.json ({other['new_keys']:,} keys)")  # fmt: skip
    cores = frames["machine"]["cpus"]
    for engine, label in JOIN_ENGINES:
        if costs := engine_costs(frames, engine):
            add(f"join_{engine}", f"point-in-time join, {label}, one {cores}-core node", costs[0] * 1e6,
                "node-s per 1M rows", costs[2])  # fmt: skip
    for engine, label in (("materialize-local", "local engine"), ("materialize-spark", "Spark engine")):
        done = [s["engines"][engine] for s in frames["sizes"]
                if s["engines"].get(engine, {}).get("status") == "ok"]  # fmt: skip
        if done:
            last = done[-1]
            add(f"mat_{engine}", f"materialize, Feast's {label}, one {cores}-core node",
                last["rows"] / last["wall_s"], "rows/s",
                f"MEASURED: bench/results/training_frame.json, {engine}, {last['rows']:,} rows "
                "into SQLite, start-up included (a lower bound)")  # fmt: skip
    add("node_cores", "cores per node (the benchmark machine)", cores, "cores", "MEASURED: the machine")
    add("ctr_keys", "CTR-history entity keys online", 50e6, "keys",
        "ASSUMPTION: as many ad/query/context keys as unique texts")  # fmt: skip
    add("text_id_bytes", "text_id (16 hex digits) + timestamp", 16 + 8, "bytes", "schema (models/schema.py)")
    return found


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(found: dict[str, Input]) -> str:
    v = {key: item.value for key, item in found.items()}
    out = ["## Inputs", ""]
    out.append(
        table(
            [[i.name, f"{i.value:,.4g}", i.unit, i.source] for i in found.values()],
            ["input", "value", "unit", "source"],
        )
    )
    impressions, texts = v["impressions"], v["texts"] * v["new_text_share"]
    compute = []

    def core_hours(name: str, units: float, unit: str, ms_per_unit: float, basis: str) -> None:
        hours = units * ms_per_unit / 1e3 / 3600
        cores = hours / 24
        compute.append(
            [name, f"{units:,.3g} {unit}", f"{ms_per_unit:.3g}", f"{hours:,.0f}", f"{cores:,.1f}", basis]
        )

    if "ingest" in v:
        core_hours("ingest (data prepare)", impressions, "rows", v["ingest"], "scaling bench, marginal")
    core_hours("ingest, 1M-row figure", impressions, "rows", v["ingest_1m"], "issue 2 note, upper bound")
    if "ctr" in v:
        core_hours("CTR history (ctr-stats)", impressions, "rows", v["ctr"], "scaling bench, marginal")
    core_hours("embed on CPU (6-layer MiniLM)", texts, "texts", v["embed_cpu"], "bench_embed")
    core_hours(
        "materialize (embeddings + CTR keys)",
        texts + v["ctr_keys"],
        "rows",
        1e3 / v["materialize"],
        "bench_feast, 1 process = 1 core",
    )
    if "e0_epoch" in v:
        core_hours("train E0, one epoch over the day", impressions, "rows", v["e0_epoch"], "scaling bench")
    core_hours("train joint on CPU, one epoch", impressions, "rows", v["joint_cpu"], "bench_joint")
    out += ["", "## Compute per day", ""]
    out.append(
        table(compute, ["stage", "units/day", "core-ms/unit", "core-hours/day", "cores for 24 h", "basis"])
    )
    gpu_embed_h = texts / v["embed_gpu"] / 3600
    gpu_joint_h = impressions * v["joint_cpu"] / 1e3 / 2 / v["joint_gpu_speedup"] / 3600
    out += [
        "",
        "## GPU alternative (every figure here rests on an UNMEASURED assumption)",
        "",
        table(
            [
                [
                    "embed 50M texts",
                    f"{texts:,.0f} / {v['embed_gpu']:,.0f} texts/s / 3600",
                    f"{gpu_embed_h:,.1f}",
                ],
                [
                    "joint training, one epoch over 1B rows",
                    f"1e9 rows x {v['joint_cpu']:.3g} core-ms / 2 cores / {v['joint_gpu_speedup']:g}x / 3600",
                    f"{gpu_joint_h:,.0f}",
                ],
            ],
            ["stage", "arithmetic", "GPU-hours/day"],
        ),
    ]
    dim = 384
    key_bytes, per_text, per_ctr = v["text_id_bytes"], v["redis_text_key"], v["redis_other_key"]
    storage = []
    for dtype, width in (("float32", 4), ("float16", 2)):
        size = v["texts"] * (dim * width + key_bytes)
        storage.append([f"embeddings (parquet), {dtype}", f"50M x ({dim} x {width} + {key_bytes:.0f}) B",
                        f"{size / 1e9:,.1f} GB"])  # fmt: skip
    redis_text = v["texts"] * per_text
    redis_f16 = v["texts"] * (per_text - dim * 2)
    redis_ctr = v["ctr_keys"] * per_ctr
    storage += [
        ["Redis, text embeddings (float32, as Feast stores them)", f"50M x {per_text:,.0f} B",
         f"{redis_text / 2**30:,.1f} GiB"],
        ["Redis, text embeddings as float16 bytes (a custom encoding, not Feast's float list)",
         f"50M x ({per_text:,.0f} - {dim * 2}) B", f"{redis_f16 / 2**30:,.1f} GiB"],
        ["Redis, CTR-history keys", f"{v['ctr_keys']:,.0f} x {per_ctr:,.0f} B",
         f"{redis_ctr / 2**30:,.1f} GiB"],
        ["Redis total (float32 embeddings)", "", f"{(redis_text + redis_ctr) / 2**30:,.1f} GiB"],
    ]  # fmt: skip
    out += ["", "## Storage and online memory", "", table(storage, ["what", "arithmetic", "size"])]
    engines = []
    for engine, label in JOIN_ENGINES:
        if f"join_{engine}" in v:
            node_hours = impressions / 1e6 * v[f"join_{engine}"] / 3600
            engines.append([f"training frame of a day's impressions, {label}",
                            f"1e9 / 1e6 x {v[f'join_{engine}']:.3g} node-s / 3600",
                            f"{node_hours:,.1f} node-hours", f"{node_hours / 4:,.1f}"])  # fmt: skip
    for engine, label in (("materialize-local", "local engine"), ("materialize-spark", "Spark engine")):
        if f"mat_{engine}" in v:
            rows = texts + v["ctr_keys"]
            node_hours = rows / v[f"mat_{engine}"] / 3600
            engines.append([f"materialize embeddings + CTR keys, {label}",
                            f"{rows:,.3g} rows / {v[f'mat_{engine}']:,.0f} rows/s / 3600",
                            f"{node_hours:,.1f} node-hours", f"{node_hours / 4:,.1f}"])  # fmt: skip
    if engines:
        out += ["", "## Feature store engines, per node", "",
                table(engines, ["stage", "arithmetic", "per day", "nodes to finish in 4 h"])]  # fmt: skip
    mean_qps = impressions / DAY_S
    peak_qps = mean_qps * v["peak_to_mean"]
    lookups = v["lookups_per_impression"]
    threads = peak_qps * lookups * v["lookup"] / 1e3
    out += [
        "",
        "## Serving lookups",
        "",
        table(
            [
                ["mean impressions/s", "1e9 / 86,400", f"{mean_qps:,.0f}"],
                ["peak impressions/s", f"x {v['peak_to_mean']:g}", f"{peak_qps:,.0f}"],
                [
                    "client threads busy at peak (one Feast call each, sequential)",
                    f"{peak_qps:,.0f} x {lookups:g} calls x {v['lookup']} ms / 1000",
                    f"{threads:,.0f}",
                ],
            ],
            ["what", "arithmetic", "value"],
        ),
    ]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scaling", type=Path, default=ROOT / "bench" / "results" / "scaling.json")
    parser.add_argument("--redis", type=Path, default=ROOT / "infra" / "redis_memory.json")
    parser.add_argument("--engines", type=Path, default=ROOT / "bench" / "results" / "training_frame.json")
    args = parser.parse_args()
    scaling = json.loads(args.scaling.read_text())
    redis = json.loads(args.redis.read_text())
    frames = json.loads(args.engines.read_text())
    print(render(inputs(scaling, redis, frames)), end="")


if __name__ == "__main__":
    main()
