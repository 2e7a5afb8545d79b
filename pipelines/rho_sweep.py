"""`nlpctr experiment --dataset simulated`: the redundancy sweep.

For each rho a simulated log (`nlpctr data simulate`), the protocol on it (without E4 unless
`simulator.distill`), then the trend of each measure against rho (`models/sweep.py`), which must
follow the known redundancy. `DIR/rho-<r>/` per value, the sweep in `DIR/results.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nlpctr.errors import UserError
from nlpctr.models import sweep
from nlpctr.models.config import deep_merge
from nlpctr.models.device import without_placement
from nlpctr.pipelines import simulate
from nlpctr.pipelines.ownership import claim_output_dir
from nlpctr.pipelines.protocol import JOB, run_protocol, write_results

SIMULATED = "simulated"


def impressions_per_row(args: argparse.Namespace, settings: Mapping[str, Any]) -> int:
    """Impressions per simulated row: --impressions-per-row, else the protocol's; 0 = binary rows."""
    value = args.impressions_per_row
    value = int(settings.get("impressions_per_row") or 0) if value is None else int(value)
    if value < 0:
        raise UserError(f"--impressions-per-row must be >= 0, got {value}")
    return value


def finished_rho(out: Path, protocol: Mapping[str, Any], args: argparse.Namespace) -> dict[str, Any] | None:
    """The results of a rho folder that a run with this protocol and seed finished, else None.
    Only without --rows / --impressions-per-row: the protocol then fixes the simulated log."""
    done = out / "results.json"
    if args.rows or args.impressions_per_row is not None or not done.is_file():
        return None
    previous = json.loads(done.read_text())
    # Where it ran is not what it computed: a sweep resumed on another device keeps its finished rho.
    kept = without_placement(previous.get("protocol") or {})
    same = kept == without_placement(json.loads(json.dumps(protocol, default=float)))
    return previous if same and previous.get("seed") == int(args.seed) else None


def run_sweep(args: argparse.Namespace, protocol: dict[str, Any]) -> dict[str, Any]:
    """The protocol (without E4) on a simulated log per rho, and the trends against rho."""
    started = time.perf_counter()
    settings = protocol["simulator"]
    rhos = [float(r) for r in args.rho.split(",")] if args.rho else [float(r) for r in settings["rho"]]
    rows = int(args.rows or settings["rows"])
    per_row = impressions_per_row(args, settings)
    if not settings.get("distill", False):
        protocol = deep_merge(protocol, {"distill": {"students": []}})
    per_rho: dict[float, dict[str, Any]] = {}
    for rho in rhos:
        out = claim_output_dir(args.out / f"rho-{rho:g}", JOB, create=True)
        finished = finished_rho(out, protocol, args)
        if finished is not None:  # a rerun of an interrupted sweep keeps the values it finished
            print(f"[experiment] rho {rho:g}: finished before with this protocol and seed; kept", flush=True)
            per_rho[rho] = finished
            continue
        log = out / "log" / "log.parquet"
        flags = ["--rows", str(rows), "--rho", str(rho), "--seed", str(args.seed)]
        flags += ["--text-strength", str(settings["text_strength"]), "--out", str(log)]
        flags += ["--impressions-per-row", str(per_row)] if per_row else []
        simulate.run(flags + (["--no-progress"] if args.no_progress else []))
        per_rho[rho] = run_protocol(args, protocol, str(log.with_name("log.spec.yaml")), out)
    kept = {rho: sweep.entry(results) for rho, results in per_rho.items()}
    results = {
        "dataset": SIMULATED,
        "seed": int(args.seed),
        "quick": bool(args.quick),
        "rows": rows,
        "impressions_per_row": per_row or None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "simulator": {
            "rho": rhos,
            "per_rho": {f"{r:g}": kept[r] for r in rhos},
            "trends": sweep.trends(kept),
            "predictions": sweep.predictions(kept),
        },
        "protocol": protocol,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(results, args.out)
    return results
