"""`nlpctr experiment --dataset simulated`: the redundancy sweep.

For each rho a simulated log (`nlpctr data simulate`), the protocol on it (without E4 unless
`simulator.distill`), then the trend of each measure against rho (`models/sweep.py`), which must
follow the known redundancy. `DIR/rho-<r>/` per value, the sweep in `DIR/results.json`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from nlpctr.errors import UserError
from nlpctr.layout import EXPERIMENT_RESULTS
from nlpctr.models import sweep
from nlpctr.models.device import without_placement
from nlpctr.models.nlp_features import FORMS
from nlpctr.models.results import ExperimentResults
from nlpctr.models.sweep import SimulatorSection, SweepResults
from nlpctr.pipelines import simulate
from nlpctr.pipelines.experiment.config import Protocol, SimulatorSettings
from nlpctr.pipelines.experiment.protocol import JOB, ExperimentRequest, run_protocol, write_results
from nlpctr.pipelines.ownership import claim_output_dir

SIMULATED = "simulated"


def impressions_per_row(request: ExperimentRequest, settings: SimulatorSettings) -> int:
    """Impressions per simulated row: --impressions-per-row, else the protocol's; 0 = binary rows."""
    value = request.impressions_per_row
    value = int(settings.impressions_per_row or 0) if value is None else int(value)
    if value < 0:
        raise UserError(f"--impressions-per-row must be >= 0, got {value}")
    return value


def finished_rho(out: Path, protocol: Protocol, request: ExperimentRequest) -> ExperimentResults | None:
    """The results of a rho folder that a run with this protocol and seed finished, else None.
    Only without --rows / --impressions-per-row: the protocol then fixes the simulated log."""
    done = out / EXPERIMENT_RESULTS
    if request.rows or request.impressions_per_row is not None or not done.is_file():
        return None
    previous: ExperimentResults = json.loads(done.read_text())
    # Where it ran is not what it computed: a sweep resumed on another device keeps its finished rho.
    kept = without_placement(previous.get("protocol") or {})  # (a file from before it was recorded)
    same = kept == without_placement(protocol.to_dict())
    return previous if same and previous.get("seed") == int(request.seed) else None


def run_rho(
    request: ExperimentRequest, protocol: Protocol, out: Path, rho: float, seed: int
) -> ExperimentResults:
    """One rho at one seed: its simulated log and the protocol on it, on `request.options`'
    infrastructure (kept when finished before)."""
    settings = protocol.simulator
    at_seed = dataclasses.replace(request, seed=seed)
    out = claim_output_dir(out, JOB, create=True)
    finished = finished_rho(out, protocol, at_seed)
    if finished is not None:  # a rerun of an interrupted sweep keeps the values it finished
        print(f"[experiment] rho {rho:g} seed {seed}: finished before with this protocol; kept", flush=True)
        return finished
    log = out / "log" / "log.parquet"
    simulate.simulate(
        simulate.SimulateRequest(
            rows=int(request.rows or settings.rows),
            rho=float(rho),
            out=log,
            seed=seed,
            text_strength=float(settings.text_strength),
            impressions_per_row=impressions_per_row(request, settings) or None,
            progress=request.progress,
        )
    )
    return run_protocol(at_seed, protocol, str(log.with_name("log.spec.yaml")), out)


def run_sweep(request: ExperimentRequest, protocol: Protocol) -> SweepResults:
    """The protocol (without E4) on a simulated log per rho, and the trends against rho; then the
    protocol's extra seeds (`simulator.seeds`) at the rho values of `simulator.seed_rho`, and the
    spread of every claim, control and gain over the seeds (`DIR/seed-<s>/rho-<r>/`)."""
    started = time.perf_counter()
    settings = protocol.simulator
    rhos = list(request.rho) if request.rho else [float(r) for r in settings.rho]  # checked already
    rows = int(request.rows or settings.rows)
    per_row = impressions_per_row(request, settings)
    if not settings.distill:
        protocol = protocol.without_students()
    seed = int(request.seed)
    per_rho = {
        rho: sweep.entry(run_rho(request, protocol, request.out / f"rho-{rho:g}", rho, seed)) for rho in rhos
    }
    per_seed = {seed: per_rho}
    extra_rho = [r for r in rhos if r in {float(v) for v in settings.seed_rho or rhos}]
    for other in (int(s) for s in settings.seeds or ()):
        if other != seed and extra_rho:
            folder = request.out / f"seed-{other}"
            per_seed[other] = {
                r: sweep.entry(run_rho(request, protocol, folder / f"rho-{r:g}", r, other)) for r in extra_rho
            }
    simulator: SimulatorSection = {
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
    results: SweepResults = {
        "dataset": SIMULATED,
        "seed": seed,
        "quick": bool(request.quick),
        "rows": rows,
        "impressions_per_row": per_row or None,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "simulator": simulator,
        "protocol": protocol.to_dict(),
    }
    request.out.mkdir(parents=True, exist_ok=True)
    write_results(results, request.out)
    return results
