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
from nlpctr.models.nlp_features import FORMS
from nlpctr.pipelines import simulate
from nlpctr.pipelines.job_options import JobOptions
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


def run_rho(
    args: argparse.Namespace, protocol: dict[str, Any], out: Path, rho: float, seed: int, options: JobOptions
) -> dict[str, Any]:
    """One rho at one seed: its simulated log and the protocol on it, on `options`' infrastructure
    (kept when finished before)."""
    settings = protocol["simulator"]
    at_seed = argparse.Namespace(**{**vars(args), "seed": seed})
    out = claim_output_dir(out, JOB, create=True)
    finished = finished_rho(out, protocol, at_seed)
    if finished is not None:  # a rerun of an interrupted sweep keeps the values it finished
        print(f"[experiment] rho {rho:g} seed {seed}: finished before with this protocol; kept", flush=True)
        return finished
    log = out / "log" / "log.parquet"
    per_row = impressions_per_row(args, settings)
    flags = ["--rows", str(int(args.rows or settings["rows"])), "--rho", str(rho), "--seed", str(seed)]
    flags += ["--text-strength", str(settings["text_strength"]), "--out", str(log)]
    flags += ["--impressions-per-row", str(per_row)] if per_row else []
    simulate.run(flags + (["--no-progress"] if args.no_progress else []))
    return run_protocol(at_seed, protocol, str(log.with_name("log.spec.yaml")), out, options)


def run_sweep(args: argparse.Namespace, protocol: dict[str, Any], options: JobOptions) -> dict[str, Any]:
    """The protocol (without E4) on a simulated log per rho, and the trends against rho; then the
    protocol's extra seeds (`simulator.seeds`) at the rho values of `simulator.seed_rho`, and the
    spread of every claim, control and gain over the seeds (`DIR/seed-<s>/rho-<r>/`)."""
    started = time.perf_counter()
    settings = protocol["simulator"]
    rhos = list(args.rho) if args.rho else [float(r) for r in settings["rho"]]  # checked by experiment
    rows = int(args.rows or settings["rows"])
    per_row = impressions_per_row(args, settings)
    if not settings.get("distill", False):
        protocol = deep_merge(protocol, {"distill": {"students": []}})
    seed = int(args.seed)
    per_rho = {
        rho: sweep.entry(run_rho(args, protocol, args.out / f"rho-{rho:g}", rho, seed, options))
        for rho in rhos
    }
    per_seed = {seed: per_rho}
    extra_rho = [r for r in rhos if r in {float(v) for v in settings.get("seed_rho") or rhos}]
    for other in (int(s) for s in settings.get("seeds") or []):
        if other != seed and extra_rho:
            folder = args.out / f"seed-{other}"
            per_seed[other] = {
                r: sweep.entry(run_rho(args, protocol, folder / f"rho-{r:g}", r, other, options))
                for r in extra_rho
            }
    simulator: dict[str, Any] = {
        "rho": rhos,
        "per_rho": {f"{r:g}": per_rho[r] for r in rhos},
        "trends": sweep.trends(per_rho),
        "predictions": [p for form in FORMS for p in sweep.predictions(per_rho, form)],
        "verdicts_by_rho": sweep.verdicts_by_rho(per_rho),
    }
    if len(per_seed) > 1:
        simulator["seeds"] = sorted(per_seed)
        simulator["per_seed"] = {
            f"{s}": {f"{r:g}": entry for r, entry in per_seed[s].items()}
            for s in sorted(per_seed)
            if s != seed
        }
        simulator["spread"] = sweep.spread(per_seed)
    results = {
        "dataset": SIMULATED,
        "seed": seed,
        "quick": bool(args.quick),
        "rows": rows,
        "impressions_per_row": per_row or None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "simulator": simulator,
        "protocol": protocol,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_results(results, args.out)
    return results
