"""Wall time and peak RSS of a service's training frame, one engine per process:

- `feast-file`: Feast's file store (pandas/Dask), `features.store.training_frame(..., offline="file")`;
- `feast-duckdb`: Feast's DuckDB offline store (ibis on DuckDB), `training_frame(..., offline="duckdb")`;
- `feast-spark`: Feast's Spark offline store, Spark in local mode on every core (the dataset
  applied with `--offline spark` first, untimed);
- `asof-shards`: the hand-written DuckDB as-of join into parquet shards,
  `features.store.write_training_shards`;
- `spark-shards`: the same shards written by Feast's Spark store (`write_training_shards` on a
  dataset applied with `--offline spark`), the streamed path past one machine;
- `materialize-local`, `materialize-spark`: a full `features.store.materialize` of the online
  views into SQLite, by Feast's local engine and by its Spark compute engine. The online views
  are entity-level and not replicated (bench/replicate_prepared.py), so their rows are the same
  at every size; the row count is shown.

Peak RSS is of the whole process tree (Spark's JVM is a child of the Python process), sampled
every 0.25 s; GNU time's figure, the Python process alone, is kept as `python_peak_rss_mb`.

One measurement (prints one JSON line: engine, service, rows, wall_s, peak_rss_mb):

    python bench/bench_training_frame.py --data DIR --engine ENGINE [--service baseline]

Every engine at several sizes, in one run (the driver):

    python bench/bench_training_frame.py --sizes 100000,1000000,5000000 [--source data/upworthy]
        [--out bench/results] [--timeout 600] [--max-rss-gb 10] [--keep-data]

For each size the driver replicates the prepared SOURCE dataset (bench/replicate_prepared.py)
to at least that many impressions, applies its Feast repo, then runs each engine as its own
process under GNU time (peak RSS of that process alone, see bench_scaling.run_stage). An engine
over --timeout seconds or --max-rss-gb of RSS is killed and recorded as such. Writes
OUT/training_frame.json and OUT/training_frame.md after every measurement; the data of each size
(OUT/work/training_frame/<rows>/) is deleted after it unless --keep-data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_scaling import run_guarded  # (bench/ is this script's folder: on sys.path)

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("feast-file", "feast-duckdb", "feast-spark", "asof-shards", "spark-shards")
ENGINES += ("materialize-local", "materialize-spark")
TIME = "/usr/bin/time"  # GNU time (Debian package `time`)
BENCH_JOB = "bench training frame"  # OUT/work/training_frame/<rows>/ is this script's
# What a service's frame holds, said in the report: the cost of vectors is not in a baseline run.
VECTORS = {"baseline": ": CTR history only, no 384-d text vectors"}


def measure(data: Path, engine: str, service: str) -> dict[str, Any]:
    """Build `service`'s training frame of `data` with `engine`; rows and wall time."""
    import pyarrow.parquet as pq

    from nlpctr.features import store

    store.apply(data, offline="spark" if "spark" in engine else "duckdb")  # untimed
    started = time.perf_counter()
    if engine.endswith("-shards"):
        shutil.rmtree(store.training_shards_dir(data, service), ignore_errors=True)  # never reuse
        root = store.write_training_shards(data, service)
        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in root.glob("*/*.parquet"))
    elif engine.startswith("materialize-"):
        rows = sum(store.materialize(data)["source_rows"].values())
    else:
        offline = engine.removeprefix("feast-")
        rows = len(store.training_frame(data, service, offline=None if offline == "spark" else offline))
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"engine": engine, "service": service, "rows": rows, "wall_s": round(wall, 1),
            "peak_rss_mb": round(peak)}  # fmt: skip


# ------------------------------------------------------------------------------- the driver


def run_engine(data: Path, engine: str, args: argparse.Namespace, log: Path) -> dict[str, Any]:
    """One engine in its own process under GNU time, killed past --timeout or --max-rss-gb."""
    usage = log.with_suffix(".time")
    command = [TIME, "-f", "%e %M", "-o", str(usage), sys.executable, str(Path(__file__).resolve()),
               "--data", str(data), "--engine", engine, "--service", args.service]  # fmt: skip
    returncode, killed, wall_s, peak_seen = run_guarded(command, log, args.max_rss, args.timeout)
    wall = round(wall_s, 1)
    lines = log.read_text(errors="replace").splitlines()
    if killed or returncode != 0:
        reason = killed or f"exit {returncode}: {(lines or [''])[-1][:300]}"
        return {"engine": engine, "status": "failed", "wall_s": wall,
                "peak_rss_mb": round(peak_seen / 2**20), "reason": reason}  # fmt: skip
    result = json.loads(next(line for line in reversed(lines) if line.startswith("{")))
    measured = usage.read_text().split()
    python_peak = round(float(measured[-1]) / 1024)  # GNU time's %M: KiB
    tree_peak = max(round(peak_seen / 2**20), python_peak)
    result.update(status="ok", peak_rss_mb=tree_peak, python_peak_rss_mb=python_peak)
    return result


def source_rows(source: Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(p).metadata.num_rows for p in (source / "impressions").glob("*.parquet"))


def prepare(source: Path, rows: int, work: Path) -> tuple[Path, int]:
    """SOURCE replicated to at least `rows` impressions under `work`, its Feast repo applied."""
    from nlpctr.pipelines.ownership import claim_output_dir, write_marker

    claim_output_dir(work, BENCH_JOB, flag="--out")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    write_marker(work, BENCH_JOB)
    copies = math.ceil(rows / source_rows(source))
    data = work / "data"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # Subprocesses: this driver stays small, so nothing of it leaks into a measured process.
    subprocess.run([sys.executable, str(ROOT / "bench" / "replicate_prepared.py"), str(source), str(data),
                    str(copies)], check=True, env=env, cwd=ROOT)  # fmt: skip
    subprocess.run([sys.executable, "-m", "nlpctr.pipelines.cli", "features", "apply", "--data", str(data)],
                   check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)  # fmt: skip
    return data, source_rows(data)


def markdown(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    config, machine = report["config"], report["machine"]
    lines = [
        "# Training frame and materialisation: Feast's file, DuckDB and Spark stores, the hand-written "
        "as-of join",
        "",
        f"`{config['command']}`",
        "",
        f"Service `{config['service']}` (its training twin){VECTORS.get(config['service'], '')}. "
        f"Data: {config['source']} replicated with "
        "distinct impression ids (`bench/replicate_prepared.py`). Each cell: wall time / peak RSS of "
        f"that engine's own process tree (sampled). Killed past {config['timeout_s']:g} s or "
        f"{config['max_rss_gb']:g} GiB RSS. Machine: {machine['cpus']} cores, {machine['memory_gib']} GiB, "
        "shared with other work (wall times are inflated by contention).",
        "",
        "| engine | " + " | ".join(f"{s['rows']:,} rows" for s in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for engine in config["engines"]:
        cells = []
        for size in sizes:
            result = size["engines"].get(engine)
            if result is None:
                cells.append("–")
            elif result["status"] == "ok":
                rows = f" ({result['rows']:,} rows)" if engine.startswith("materialize-") else ""
                cells.append(f"{result['wall_s']:.1f} s, {result['peak_rss_mb']:,} MB{rows}")
            else:
                cells.append(f"**failed**: {result['reason']}")
        lines.append(f"| {engine} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(sizes: dict[int, dict[str, Any]], out: Path, args: argparse.Namespace) -> None:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    report = {
        "machine": {
            "cpus": os.cpu_count(),
            "memory_gib": round(pages / 2**30, 1),
            "python": platform.python_version(),
        },
        "config": {
            "command": "python bench/bench_training_frame.py " + " ".join(sys.argv[1:]),
            "service": args.service,
            "source": str(args.source.relative_to(ROOT) if args.source.is_relative_to(ROOT) else args.source),
            "engines": list(args.engines),
            "timeout_s": args.timeout,
            "max_rss_gb": args.max_rss_gb,
        },
        "sizes": [sizes[k] for k in sorted(sizes)],
    }
    (out / "training_frame.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "training_frame.md").write_text(markdown(report))


def drive(args: argparse.Namespace) -> None:
    sys.stdout.reconfigure(line_buffering=True)
    if not os.access(TIME, os.X_OK):
        sys.exit(f"bench_training_frame: needs GNU time at {TIME} (apt-get install time)")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[int, dict[str, Any]] = {}
    for wanted in args.sizes:
        work = out / "work" / "training_frame" / str(wanted)
        data, rows = prepare(args.source, wanted, work)
        size: dict[str, Any] = {"requested": wanted, "rows": rows, "engines": {}}
        sizes[wanted] = size
        for engine in args.engines:
            result = run_engine(data, engine, args, work / f"{engine}.log")
            size["engines"][engine] = result
            shown = f"{result['wall_s']:.1f} s, {result['peak_rss_mb']:,} MB"
            print(f"{rows:>10,} {engine:<13} {result['status']:<7} {shown} {result.get('reason', '')}")
            write_report(sizes, out, args)
        if not args.keep_data:
            shutil.rmtree(work)
    if not args.keep_data:
        shutil.rmtree(out / "work" / "training_frame", ignore_errors=True)
    print(f"wrote {out / 'training_frame.md'} and {out / 'training_frame.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="measure one engine on this prepared dataset")
    parser.add_argument("--engine", choices=ENGINES)
    parser.add_argument("--service", default="baseline")
    driver = parser.add_argument_group("driver")
    driver.add_argument("--sizes", default="100000,1000000,5000000", help="impressions, comma-separated")
    driver.add_argument("--engines", default=",".join(ENGINES), help="comma-separated")
    driver.add_argument("--source", type=Path, default=ROOT / "data" / "upworthy", help="a prepared dataset")
    driver.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    driver.add_argument("--timeout", type=float, default=600.0, help="kill an engine after this (s)")
    driver.add_argument("--max-rss-gb", type=float, default=10.0, help="kill an engine above this RSS")
    driver.add_argument("--keep-data", action="store_true", help="keep each size's data")
    driver.add_argument(
        "--report-only", action="store_true", help="rebuild OUT/training_frame.md from its .json; run nothing"
    )
    args = parser.parse_args()
    if args.report_only:
        path = args.out.resolve() / "training_frame.json"
        (path.parent / "training_frame.md").write_text(markdown(json.loads(path.read_text())))
        return
    if args.data is not None:
        if args.engine is None:
            parser.error("--data needs --engine")
        print(json.dumps(measure(args.data.resolve(), args.engine, args.service)))
        return
    args.source = args.source.resolve()
    args.sizes = sorted({int(float(s)) for s in args.sizes.split(",") if s.strip()})
    args.engines = [e for e in args.engines.split(",") if e]
    if unknown := set(args.engines) - set(ENGINES):
        parser.error(f"unknown engines {', '.join(sorted(unknown))}; choose from {', '.join(ENGINES)}")
    args.max_rss = int(args.max_rss_gb * 2**30)
    drive(args)


if __name__ == "__main__":
    main()
