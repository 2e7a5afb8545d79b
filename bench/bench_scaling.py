"""Scaling benchmark: wall time, CPU time and peak RSS of every stage at growing log sizes.

    python bench/bench_scaling.py [--rows 10000,100000,1000000,5000000] [--out bench/results]
                                  [--max-rss-gb 12] [--stage-timeout 3600] [--keep-data]

For each size N it simulates a log (`nlpctr data simulate --rows N`), then runs every stage
as its own `nlpctr` subprocess, exactly as a user would:

    simulate -> prepare -> ctr-stats -> embed -> features apply -> materialize
             -> train E0 (baseline) -> train joint (concat) -> evaluate (joint vs E0)

Per stage it records wall time, CPU time (user + sys) and peak RSS, read by GNU time from
the stage's own process: per stage, never the running maximum over earlier stages that
RUSAGE_CHILDREN reports (see `run_stage` for why not wait4 either).

Bounded work, so that sizes compare:
- embed uses a 1-layer truncated MiniLM, for speed (the encoder's cost grows about linearly
  with its layers; 6-layer throughput is measured in bench_embed.py); it encodes each unique
  text once, so its cost follows unique texts, which are reported per size;
- train E0 runs a fixed `--e0-epochs` (default 1, no early stop), so its cost follows rows, not
  convergence;
- train joint uses a 1-layer LM, 1 epoch of at most `--joint-batches` batches (via
  `loop.max_batches_per_epoch` in a --config YAML); its loading, validation, test prediction
  and LM-feature write-back still cover every row.

A failed stage (non-zero exit, over `--max-rss-gb`, over `--stage-timeout`) is recorded with its
reason and the stages that need its output are skipped; the benchmark goes on to the next size.
Results merge into OUT/scaling.json by size, so sizes can be run separately. Writes
OUT/scaling.json, OUT/scaling.md and OUT/scaling.png; the data and logs of each size go to
OUT/work/ (git-ignored; all but the logs deleted after each size unless --keep-data).
Needs GNU time at /usr/bin/time (Debian package `time`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from nlpctr.layout import EMBEDDINGS, EMBEDDINGS_MANIFEST
from nlpctr.pipelines.ownership import claim_output_dir, write_marker

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results"
BENCH_JOB = "bench scaling"  # OUT/work/<rows>/ is this script's (ownership.RECOGNISED)
TIME = "/usr/bin/time"  # GNU time (Debian package `time`)
WORSE_THAN_LINEAR = 1.15  # growth exponent above which a stage is flagged
MEMORY_TARGET_MIB = 4096  # peak RSS every stage must stay under (drawn on the plot)
EMBED_LAYERS = 1
JOINT_LAYERS = 1


@dataclass(frozen=True)
class Stage:
    name: str
    args: list[str]  # after `nlpctr`; {log}, {spec}, {data}, {runs}, {config} are filled in per size
    needs: tuple[str, ...]


STAGES = [
    Stage("simulate", ["data", "simulate", "--rows", "{rows}", "--redundancy", "0.5", "--seed", "0",
                       "--out", "{log}", "--no-progress"], ()),
    Stage("prepare", ["data", "prepare", "--dataset", "{spec}", "--out", "{data}"], ("simulate",)),
    Stage("ctr-stats", ["ctr-stats", "--data", "{data}"], ("prepare",)),
    Stage("embed", ["embed", "--data", "{data}", "--layers", str(EMBED_LAYERS)], ("prepare",)),
    Stage("features-apply", ["features", "apply", "--data", "{data}"], ("ctr-stats", "embed")),
    Stage("materialize", ["features", "materialize", "--data", "{data}"], ("features-apply",)),
    Stage("train-e0", ["train", "--mode", "baseline", "--data", "{data}", "--run", "e0",
                       "--runs-dir", "{runs}", "--config", "{config}", "--no-progress"], ("features-apply",)),
    Stage("train-joint", ["train", "--mode", "joint", "--fusion", "concat", "--layers", str(JOINT_LAYERS),
                          "--data", "{data}", "--run", "joint", "--runs-dir", "{runs}",
                          "--config", "{config}", "--no-progress"], ("features-apply",)),
    Stage("evaluate", ["evaluate", "--run", "joint", "--baseline", "e0", "--runs-dir", "{runs}"],
          ("train-e0", "train-joint")),
]  # fmt: skip


@dataclass
class StageResult:
    status: str  # ok | failed | skipped
    wall_s: float | None = None
    cpu_s: float | None = None
    peak_rss_mib: float | None = None
    reason: str | None = None


def train_config(e0_epochs: int, joint_batches: int) -> dict[str, Any]:
    """The --config both trainings get: fixed-length E0, a bounded joint run."""
    return {
        "loop": {"epochs": e0_epochs, "patience": e0_epochs + 1},
        "modes": {"joint": {"loop": {"epochs": 1, "max_batches_per_epoch": joint_batches}}},
    }


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants now (for the over-limit guard only)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            with open(f"/proc/{current}/statm") as statm:
                total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    todo.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return total


def run_guarded(
    command: list[str], log: Path, max_rss: int, timeout_s: float
) -> tuple[int, str | None, float, int]:
    """Run `command` in its own session (output to `log`), killed whole past `max_rss` bytes of
    resident memory or `timeout_s`: (exit code, why it was killed or None, wall s, peak RSS seen)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started, killed_for, peak_seen = time.perf_counter(), None, 0
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
        )
        while process.poll() is None:
            rss = tree_rss_bytes(process.pid)
            peak_seen = max(peak_seen, rss)
            elapsed = time.perf_counter() - started
            if rss > max_rss:
                killed_for = f"killed: RSS {rss / 2**30:.1f} GiB over the {max_rss / 2**30:g} GiB limit"
            elif elapsed > timeout_s:
                killed_for = f"killed: over the {timeout_s:g} s limit, at {rss / 2**30:.1f} GiB RSS"
            if killed_for:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                break
            time.sleep(0.25)
    return process.returncode, killed_for, time.perf_counter() - started, peak_seen


def run_stage(argv: list[str], log: Path, max_rss: int, timeout_s: float) -> StageResult:
    """Run one `nlpctr` command under /usr/bin/time; measure it; kill it past the limits.

    /usr/bin/time reports its child's own rusage. Measuring with wait4 from this driver would
    not be exact: a forked child's peak RSS starts at the parent's (Linux carries the high-water
    mark over fork and exec), so the driver's own memory would leak into every stage's peak.
    """
    usage_file = log.with_suffix(".time")
    command = [TIME, "-f", "%e %U %S %M", "-o", str(usage_file), sys.executable, "-m", "nlpctr.pipelines.cli"]
    returncode, killed_for, wall, _ = run_guarded([*command, *argv], log, max_rss, timeout_s)
    result = StageResult(status="ok", wall_s=round(wall, 2))
    measured = usage_file.read_text().split() if usage_file.is_file() else []
    if len(measured) >= 4 and not killed_for:
        # the last line holds the figures; a signalled child adds a "Command terminated" line first
        _elapsed, user, system, max_rss_kib = (float(v) for v in measured[-4:])
        result.cpu_s = round(user + system, 2)
        result.peak_rss_mib = round(max_rss_kib / 1024, 1)
    if killed_for or returncode != 0:
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
        result.status = "failed"
        result.reason = killed_for or f"exit {returncode}: {tail[0][:300] if tail else ''}"
    return result


def unique_texts(data: Path) -> int | None:
    """Texts the embedding job encoded (its manifest's rows: one per unique normalised text)."""
    for manifest in sorted((data / EMBEDDINGS).glob(f"*/{EMBEDDINGS_MANIFEST}")):
        return int(json.loads(manifest.read_text())["rows"])
    return None


def run_size(
    rows: int, work: Path, args: argparse.Namespace, on_stage: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Every stage at one size; `on_stage` gets the partial result after each stage."""
    # The size's folder is replaced only when it is new, empty or this script's earlier one.
    claim_output_dir(work, BENCH_JOB, flag="--out")
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    write_marker(work, BENCH_JOB)
    config = work / "train.yaml"
    config.write_text(yaml.safe_dump(train_config(args.e0_epochs, args.joint_batches), sort_keys=False))
    fill = {
        "{rows}": str(rows),
        "{log}": str(work / "log.parquet"),
        "{spec}": str(work / "log.spec.yaml"),
        "{data}": str(work / "data"),
        "{runs}": str(work / "runs"),
        "{config}": str(config),
    }
    results: dict[str, StageResult] = {}
    for stage in STAGES:
        missing = [need for need in stage.needs if results[need].status != "ok"]
        if missing:
            result = StageResult("skipped", reason=f"needs {', '.join(missing)}")
        else:
            argv = [fill.get(arg, arg) for arg in stage.args]
            result = run_stage(argv, work / "logs" / f"{stage.name}.log", args.max_rss, args.stage_timeout)
        results[stage.name] = result
        reason = f"  ({result.reason})" if result.reason else ""
        shown = "" if result.status == "skipped" else figures(asdict(result))
        print(f"  {rows:>9,} {stage.name:<15} {result.status:<7} {shown}{reason}")
        size = {
            "rows": rows,
            "unique_texts": unique_texts(work / "data"),
            "stages": {name: asdict(result) for name, result in results.items()},
        }
        on_stage(size)
    return size


# ------------------------------------------------------------------------------- analysis


def exponent(small: float | None, large: float | None, n_small: int, n_large: int) -> float | None:
    """log-log slope between two sizes: 1 = linear, 0 = flat (fixed cost), >1 = worse than linear."""
    if not small or not large or small <= 0 or large <= 0:
        return None
    return math.log(large / small) / math.log(n_large / n_small)


def growth(sizes: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per stage, the exponents of wall, CPU and RSS between consecutive measured sizes."""
    out: dict[str, list[dict[str, Any]]] = {}
    for stage in STAGES:
        steps = []
        ok = [s for s in sizes if s["stages"].get(stage.name, {}).get("status") == "ok"]
        for small, large in itertools.pairwise(ok):
            a, b = small["stages"][stage.name], large["stages"][stage.name]
            n0, n1 = small["rows"], large["rows"]
            wall = exponent(a["wall_s"], b["wall_s"], n0, n1)
            steps.append(
                {
                    "from_rows": n0,
                    "to_rows": n1,
                    "wall": wall,
                    "cpu": exponent(a["cpu_s"], b["cpu_s"], n0, n1),
                    "rss": exponent(a["peak_rss_mib"], b["peak_rss_mib"], n0, n1),
                    "worse_than_linear": wall is not None and wall > WORSE_THAN_LINEAR,
                }
            )
        out[stage.name] = steps
    return out


def figures(result: dict[str, Any]) -> str:
    """wall / CPU / peak RSS; a killed stage has only its wall time."""
    cpu, rss = result["cpu_s"], result["peak_rss_mib"]
    return (
        f"{result['wall_s']:.1f} s / {'?' if cpu is None else f'{cpu:.0f}'} cpu-s / "
        f"{'?' if rss is None else f'{rss:,.0f}'} MiB"
    )


def _cell(result: dict[str, Any] | None) -> str:
    if not result:
        return "–"
    if result["status"] == "skipped":
        return f"skipped ({result['reason']})"
    text = figures(result)
    return text if result["status"] == "ok" else f"**failed** after {text}: {result['reason']}"


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    sizes = report["sizes"]
    header = "| stage | " + " | ".join(f"{s['rows']:,} rows" for s in sizes) + " |"
    lines = [
        "# Scaling benchmark (`bench/bench_scaling.py`)",
        "",
        f"Machine: {report['machine']['cpus']} CPU cores, torch threads "
        f"{report['machine']['torch_threads']}, "
        f"{report['machine']['memory_gib']} GiB RAM, Python {report['machine']['python']}. "
        f"Each cell: wall time / CPU time (user+sys) / peak RSS of that stage's process. "
        f"embed: {EMBED_LAYERS}-layer MiniLM; train E0: {report['config']['e0_epochs']} fixed epoch(s); "
        "train joint: "
        f"{JOINT_LAYERS}-layer LM, 1 epoch of <= {report['config']['joint_batches']} batches "
        "(bounded work; loading, validation and test prediction still cover every row). "
        "On a shared machine, contention inflates wall time; CPU time is the steadier figure.",
        "",
        header,
        "|---|" + "---|" * len(sizes),
    ]
    for stage in STAGES:
        cells = [_cell(s["stages"].get(stage.name)) for s in sizes]
        lines.append(f"| {stage.name} | " + " | ".join(cells) + " |")
    lines.append(
        "| **unique texts** (embedded) | "
        + " | ".join("–" if s["unique_texts"] is None else f"{s['unique_texts']:,}" for s in sizes)
        + " |"
    )
    lines += [
        "",
        "## Growth exponents (log-log slope between consecutive sizes)",
        "",
        f"1 = linear; < 1 = a fixed cost (imports, startup) still dominates; > {WORSE_THAN_LINEAR} "
        "is flagged **worse than linear**. The verdict reads the wall-time exponent.",
        "",
        "| stage | sizes | wall | CPU | peak RSS | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for name, steps in report["growth"].items():
        for step in steps:
            verdict = "**worse than linear**" if step["worse_than_linear"] else "linear or better"
            lines.append(
                f"| {name} | {step['from_rows']:,} → {step['to_rows']:,} | {_fmt(step['wall'])} | "
                f"{_fmt(step['cpu'])} | {_fmt(step['rss'])} | {verdict} |"
            )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    panels = [("wall_s", "wall time (s)"), ("cpu_s", "CPU time, user+sys (s)")]
    panels.append(("peak_rss_mib", "peak RSS (MiB)"))
    for axis, (key, label) in zip(axes, panels, strict=True):
        for stage in STAGES:
            points = [
                (s["rows"], s["stages"][stage.name][key])
                for s in report["sizes"]
                if s["stages"].get(stage.name, {}).get("status") == "ok"
            ]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=stage.name)
        rows = [s["rows"] for s in report["sizes"]]
        if len(rows) > 1:
            # slope-1 reference through the geometric middle of what is drawn
            values = [line.get_ydata() for line in axis.get_lines()]
            anchor = math.exp(sum(math.log(v) for ys in values for v in ys) / sum(len(ys) for ys in values))
            middle = math.sqrt(rows[0] * rows[-1])
            axis.plot(
                [rows[0], rows[-1]],
                [anchor * rows[0] / middle, anchor * rows[-1] / middle],
                "k--",
                linewidth=1,
                label="linear (slope 1)",
            )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("rows (impressions)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    # the target the issue sets for every stage at 5M rows
    axes[2].axhline(MEMORY_TARGET_MIB, color="red", linestyle=":", label="4 GiB target")
    axes[2].legend(handles=axes[2].get_lines()[-1:], fontsize=8, loc="upper left")
    figure.suptitle("nlpctr stages vs log size (each stage its own process)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def machine() -> dict[str, Any]:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    memory = round(pages / 2**30, 1)
    # OMP_NUM_THREADS caps torch's intra-op threads in every stage (unset: one per core)
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    return {
        "cpus": os.cpu_count(),
        "memory_gib": memory,
        "python": platform.python_version(),
        "torch_threads": threads,
    }


def write_report(
    sizes: list[dict[str, Any]], out: Path, args: argparse.Namespace, ran_on: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`ran_on`: the machine the sizes were measured on (default: this one, now)."""
    report = {
        "machine": ran_on or machine(),
        "config": {
            "embed_layers": EMBED_LAYERS,
            "joint_layers": JOINT_LAYERS,
            "e0_epochs": args.e0_epochs,
            "joint_batches": args.joint_batches,
            "max_rss_gb": args.max_rss / 2**30,
            "stage_timeout_s": args.stage_timeout,
        },
        "sizes": sorted(sizes, key=lambda s: s["rows"]),
    }
    report["growth"] = growth(report["sizes"])
    (out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "scaling.md").write_text(markdown(report))
    plot(report, out / "scaling.png")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,100000,1000000,5000000", help="comma-separated sizes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--e0-epochs", type=int, default=1, help="train E0: fixed epochs")
    parser.add_argument("--joint-batches", type=int, default=50, help="joint: batches in its one epoch")
    parser.add_argument("--max-rss-gb", type=float, default=12.0, help="kill a stage above this RSS")
    parser.add_argument("--stage-timeout", type=float, default=3600.0, help="kill a stage after this (s)")
    parser.add_argument("--keep-data", action="store_true", help="keep OUT/work/<rows>/ after each size")
    parser.add_argument("--fresh", action="store_true", help="drop earlier sizes from OUT/scaling.json")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild scaling.md/.png from scaling.json; run nothing"
    )
    args = parser.parse_args(argv)
    args.max_rss = int(args.max_rss_gb * 2**30)
    args.sizes = sorted({int(float(size)) for size in args.rows.split(",") if size.strip()})
    return args


def main(argv: list[str] | None = None) -> None:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up in a redirected log
    args = parse_args(argv)
    if not os.access(TIME, os.X_OK):
        sys.exit(f"bench_scaling: needs GNU time at {TIME} (apt-get install time)")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    previous = out / "scaling.json"
    kept = {}
    if previous.is_file() and not args.fresh:
        kept = {s["rows"]: s for s in json.loads(previous.read_text())["sizes"]}
    if args.report_only:
        measured = json.loads(previous.read_text())
        config = measured["config"]  # report the settings and machine it ran with
        args.joint_batches, args.stage_timeout = config["joint_batches"], config["stage_timeout_s"]
        args.e0_epochs = config["e0_epochs"]
        args.max_rss = int(config["max_rss_gb"] * 2**30)
        write_report(list(kept.values()), out, args, ran_on=measured["machine"])
        print(f"rebuilt {out / 'scaling.md'} and {out / 'scaling.png'} from {previous}")
        return
    for rows in args.sizes:
        print(f"{rows:,} rows:", flush=True)
        work = out / "work" / str(rows)

        def record(size: dict[str, Any], rows: int = rows) -> None:
            kept[rows] = size  # the report is rewritten after every stage: a later crash loses nothing
            write_report(list(kept.values()), out, args)

        run_size(rows, work, args, record)
        if not args.keep_data:  # keep only the stage logs
            for path in work.iterdir():
                if path.name != "logs":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"wrote {out / 'scaling.md'}, {out / 'scaling.json'}, {out / 'scaling.png'}")


if __name__ == "__main__":
    main()
