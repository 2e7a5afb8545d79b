"""The whole experiment protocol in one command (DESIGN.md, "Experiment protocol").

    nlpctr experiment --dataset NAME [--quick] [--seed S] --out DIR [--config FILE] [...]
    nlpctr experiment --dataset simulated [--rho 0,0.5,1] [--rows N] [--quick] --out DIR

The command (flags, the summary): prepare -> CTR history -> embeddings -> Feast -> E0..E3 ->
E4 -> redundancy, written to `DIR/results.json`, `DIR/report.md` and plots. Beside it: the
protocol's sizes (`config.py`), one dataset's protocol (`protocol.py`), E4 (`students.py`), the
sweep (`sweep.py`). Flags: docs/USAGE.md, "The experiment"; output folder rules and the
increments' join: docs/DESIGN.md, "Modules in detail", `pipelines/experiment/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nlpctr.errors import UserError
from nlpctr.models.results import ExperimentResults
from nlpctr.models.sweep import SweepResults
from nlpctr.pipelines.experiment.config import Protocol, load_protocol, parse_rho
from nlpctr.pipelines.experiment.protocol import (
    BASELINE_RUN,
    JOB,
    ExperimentRequest,
    experiment_placement,
    run_protocol,
)
from nlpctr.pipelines.experiment.sweep import SIMULATED, run_sweep
from nlpctr.pipelines.feature_store_cli import add_store_flags, store_choice
from nlpctr.pipelines.job_options import JobOptions, beam_flags
from nlpctr.pipelines.ownership import claim_output_dir, refuse_glob_characters
from nlpctr.pipelines.specs import load_spec
from nlpctr.pipelines.train import add_placement_flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags; `job_options` (a `JobOptions`) holds the Beam options and the store choice."""
    parser = argparse.ArgumentParser(prog="nlpctr experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help=f"bundled dataset, spec YAML, or {SIMULATED!r}")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--quick", action="store_true", help="small LM, few steps (minutes on a laptop)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--config", type=Path, default=None, help="YAML merged over the protocol sizes")
    parser.add_argument(
        "--encoder",
        default=None,
        help="the encoder (an installed package or a model folder): E1's vectors and E2-E4's LM",
    )
    parser.add_argument("--rho", default=None, help="simulated: comma-separated redundancy values")
    parser.add_argument("--rows", type=int, default=None, help="simulated: rows per log")
    parser.add_argument(
        "--impressions-per-row",
        type=int,
        default=None,
        help="simulated: aggregated rows of N impressions each (0: one binary impression per row)",
    )
    add_placement_flags(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_store_flags(parser)
    args, beam = parser.parse_known_args(argv)
    args.job_options = JobOptions(beam=beam_flags(beam, parser.prog), store=store_choice(args))
    return args


def request_of(args: argparse.Namespace) -> ExperimentRequest:
    """The flags as a request, each checked: a refused run leaves nothing behind."""
    if args.dataset != SIMULATED and (
        args.rho is not None or args.rows is not None or args.impressions_per_row is not None
    ):
        raise UserError(f"--rho, --rows and --impressions-per-row go with --dataset {SIMULATED}")
    rho = tuple(parse_rho(args.rho)) if args.rho is not None else None
    if args.rows is not None and args.rows < 1:
        raise UserError(f"--rows must be a positive number of impressions, got {args.rows}")
    if args.impressions_per_row is not None and args.impressions_per_row < 0:
        raise UserError(f"--impressions-per-row must be >= 0, got {args.impressions_per_row}")
    return ExperimentRequest(
        dataset=args.dataset,
        out=args.out.resolve(),
        quick=args.quick,
        seed=args.seed,
        config=args.config,
        encoder=args.encoder,
        rho=rho,
        rows=args.rows,
        impressions_per_row=args.impressions_per_row,
        device=args.device,
        precision=args.precision,
        progress=not args.no_progress,
        options=args.job_options,
    )


def run(argv: list[str] | None = None) -> ExperimentResults | SweepResults:
    """`nlpctr experiment`: the flags as an `ExperimentRequest` to `experiment`; returns the
    results with a one-line `summary`."""
    args = parse_args(argv)
    protocol = load_protocol(
        args.quick, args.config, simulated=args.dataset == SIMULATED, encoder=args.encoder
    )
    return experiment(request_of(args), protocol)


def experiment(request: ExperimentRequest, protocol: Protocol) -> ExperimentResults | SweepResults:
    """The protocol on one dataset, or the sweep over rho on simulated logs.

    Args:
        request: the dataset, the output folder and the flags.
        protocol: the protocol (`load_protocol`), checked.

    Returns:
        The results (results.json's content) with a one-line `summary`.

    Raises:
        UserError: a flag or folder refused before any work, or a job's own refusal.
    """
    # Every flag is checked before --out is made: a refused run leaves nothing behind.
    refuse_glob_characters(request.out, "--out")
    experiment_placement(request, protocol)  # a device that is not there: one line, before any work
    # Before any work: --out is new, empty or an earlier experiment's folder (then marked as
    # this job's), and holds neither the spec nor the source log.
    inputs = []
    if request.dataset != SIMULATED:
        spec = load_spec(request.dataset)
        inputs = [spec.spec_path, *spec.source.inputs]
    claim_output_dir(request.out, JOB, inputs=inputs, create=True)
    if request.dataset == SIMULATED:
        swept = run_sweep(request, protocol)
        simulator = swept["simulator"]
        shown = ", ".join(f"{p['id']}/{p['form']} {p['verdict']}" for p in simulator["predictions"])
        control = simulator["verdicts_by_rho"].get("lm_stage_beats_probe", {})
        beats = ", ".join(f"rho {r} {v['verdict']}" for r, v in control.items())
        swept["summary"] = (
            f"experiment simulated: {len(simulator['rho'])} rho values x {swept['rows']} rows, seeds "
            f"{simulator.get('seeds', [swept['seed']])}; predictions: {shown}; LM stage beats the probe: "
            f"{beats}; {swept['wall_seconds']:.0f} s -> {request.out}/report.md"
        )
        return swept
    results = run_protocol(request, protocol, request.dataset, request.out)
    runs = results["runs"]
    best = max((k for k in runs if k != BASELINE_RUN), key=lambda k: runs[k]["auc"])
    verdicts = ", ".join(
        f"{c['id']}/{c['form']}{'@L' + str(c['detail']['layers']) if 'layers' in c['detail'] else ''} "
        f"{c['verdict']}"
        for c in results["claims"]
    )
    control = next((c for c in results.get("controls", []) if "delta_valid_logloss" in c), None)
    if control is not None:
        verdicts += f"; LM stage beats the probe (valid log loss): {control['verdict']}"
    results["summary"] = (
        f"experiment {results['dataset']}: E0 AUC {runs[BASELINE_RUN]['auc']:.4f}; best {best} "
        f"{runs[best]['auc']:.4f} (ΔAUC {runs[best]['delta_auc_vs_baseline']:+.4f}); "
        f"{len(results['redundancy'])} features measured, {len(results.get('distillation', {}))} students; "
        f"claims: {verdicts}; {results['wall_seconds']:.0f} s -> {request.out}/report.md"
    )
    return results
