"""The whole experiment protocol in one command (DESIGN.md, "Experiment protocol").

    nlpctr experiment --dataset NAME [--quick] [--seed S] --out DIR [--config FILE] [...]
    nlpctr experiment --dataset simulated [--rho 0,0.5,1] [--rows N] [--quick] --out DIR

The command (flags, protocol sizes, the summary): prepare -> CTR history -> embeddings -> Feast
-> E0..E3 -> E4 -> redundancy, written to `DIR/results.json`, `DIR/report.md` and plots. One
dataset's protocol is `pipelines/protocol.py`, E4 `pipelines/distillation.py`, the sweep
`pipelines/rho_sweep.py`. Flags: docs/USAGE.md, "The experiment"; output folder rules and the
increments' join: docs/DESIGN.md, "Modules in detail", experiment.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any

from nlpctr.config_files import LEAF, Schema, check_keys, is_integer, read_mapping
from nlpctr.errors import UserError
from nlpctr.models.config import check_training_config, deep_merge, key_tree, training_schema
from nlpctr.models.ctr_net import FUSIONS
from nlpctr.models.encoder import EncoderConfig
from nlpctr.models.encoder_source import resolve_encoder
from nlpctr.models.trainer import LoopConfig
from nlpctr.pipelines.feature_store_cli import add_store_flags, store_choice
from nlpctr.pipelines.job_options import JobOptions, beam_flags
from nlpctr.pipelines.ownership import claim_output_dir, refuse_glob_characters
from nlpctr.pipelines.protocol import BASELINE_RUN, JOB, ExperimentRequest, experiment_placement, run_protocol
from nlpctr.pipelines.rho_sweep import SIMULATED, run_sweep
from nlpctr.pipelines.specs import load_spec
from nlpctr.pipelines.train import add_placement_flags

PROTOCOL = Path(__file__).resolve().parents[1] / "models" / "configs" / "experiment.yaml"


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


def protocol_schema() -> Schema:
    """Every key experiment.yaml (and so a `--config` over it) may hold; `train_config` sections
    are training configs, E4's loops LoopConfigs."""
    protocol = read_mapping(PROTOCOL, str(PROTOCOL), "reinstall nlpctr")
    protocol.pop("quick", None)  # applied by --quick; a user's own `quick:` would be ignored
    schema = key_tree(protocol)
    loop = dict.fromkeys((f.name for f in dataclasses.fields(LoopConfig)), LEAF)
    schema["train_config"] = training_schema()
    schema["simulator"] = {**schema["simulator"], "train_config": training_schema()}
    schema["distill"] = {**schema["distill"], "loop": loop, "feature_kd": loop}
    return schema


def load_protocol(
    quick: bool, config_file: Path | None, simulated: bool = False, encoder: str | None = None
) -> dict[str, Any]:
    """experiment.yaml (for the sweep, its `simulator.train_config` over `train_config`), its
    `quick:` section when asked, then `--config`, then `--encoder` (`with_encoder`); checked before
    anything runs."""
    protocol = read_mapping(PROTOCOL, str(PROTOCOL), "reinstall nlpctr")
    quick_section = protocol.pop("quick")
    what = str(PROTOCOL.name)
    if config_file is not None:
        what = f"--config {config_file}"
        user = read_mapping(config_file, what, "fix the file")
        check_keys(user, protocol_schema(), what)
    if simulated:  # before `quick:`, whose sizes win
        protocol = deep_merge(protocol, {"train_config": protocol["simulator"].get("train_config") or {}})
    if quick:
        protocol = deep_merge(protocol, quick_section)
    if simulated and "fusions" in protocol["simulator"]:  # the sweep's own, quick or not
        protocol["fusions"] = protocol["simulator"]["fusions"]
    if config_file is not None:
        protocol = deep_merge(protocol, user)
    protocol = with_encoder(protocol, encoder)
    check_protocol(protocol, what)
    return protocol


def check_protocol(protocol: dict[str, Any], what: str) -> None:
    """Values no training config checks, and the training config itself, before any work."""
    fusions = protocol["fusions"]
    if not isinstance(fusions, list) or not fusions or any(f not in FUSIONS for f in fusions):
        raise UserError(f"{what}: fusions must be a non-empty list of {', '.join(FUSIONS)}, got {fusions!r}")
    for key in ("embed_layers", "lm_layers"):
        EncoderConfig(name=protocol["encoder"], layers=protocol[key])  # a UserError names the range
    students = protocol["distill"]["students"]
    if not isinstance(students, list) or not all(is_integer(k) for k in students):
        raise UserError(f"{what}: distill.students must be a list of layer counts, got {students!r}")
    if students and max(students) > int(protocol["lm_layers"]):
        raise UserError(
            f"students of {max(students)} layers need a teacher of at least as many; lm_layers is "
            f"{protocol['lm_layers']}"
        )
    if students and protocol["distill"]["teacher_fusion"] not in ["best", *protocol["fusions"]]:
        raise UserError(f"distill.teacher_fusion must be `best` or one of fusions {protocol['fusions']}")
    parse_rho(protocol["simulator"]["rho"], f"{what}: simulator.rho")
    check_training_config(protocol["train_config"] or {}, f"{what}: train_config")


def parse_rho(values: Any, flag: str = "--rho") -> list[float]:
    """Redundancy values: a comma-separated flag or a list, each a number in [0, 1], none twice.

    Raises:
        UserError: anything else, before any folder is made.
    """
    items = values.split(",") if isinstance(values, str) else values
    if not isinstance(items, list | tuple) or not items:
        raise UserError(f"{flag} must list values of rho in [0, 1], e.g. 0,0.5,1; got {values!r}")
    rhos = []
    for item in items:
        try:
            rho = float(item.strip() if isinstance(item, str) else item)
        except (TypeError, ValueError):
            rho = math.nan
        if isinstance(item, bool) or not 0 <= rho <= 1:  # NaN fails too
            raise UserError(
                f"{flag}: {str(item)[:40]!r} is not a value of rho in [0, 1]; pass comma-separated numbers, "
                "e.g. 0,0.5,1"
            )
        if rho in rhos:
            raise UserError(f"{flag}: rho {rho:g} is given twice")
        rhos.append(rho)
    return rhos


def with_encoder(protocol: dict[str, Any], encoder: str | None) -> dict[str, Any]:
    """The protocol with its encoder (`encoder`, else the protocol's) resolved, checked deep enough
    for its layer counts, and set as every training run's `encoder.name`."""
    source = resolve_encoder(encoder or protocol["encoder"])
    for key in ("embed_layers", "lm_layers"):
        if int(protocol[key]) > source.depth:
            raise UserError(
                f"{key} is {protocol[key]} but the encoder {source.model_name} has {source.depth} layers; "
                f"set {key} (and distill.students) to at most {source.depth} with --config FILE"
            )
    train_config = deep_merge(protocol["train_config"], {"encoder": {"name": source.name}})
    return {**protocol, "encoder": source.name, "train_config": train_config}


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


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """`nlpctr experiment`: the flags as an `ExperimentRequest` to `experiment`; returns the
    results with a one-line `summary`."""
    args = parse_args(argv)
    protocol = load_protocol(
        args.quick, args.config, simulated=args.dataset == SIMULATED, encoder=args.encoder
    )
    return experiment(request_of(args), protocol)


def experiment(request: ExperimentRequest, protocol: dict[str, Any]) -> dict[str, Any]:
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
        results = run_sweep(request, protocol)
        simulator = results["simulator"]
        shown = ", ".join(f"{p['id']}/{p['form']} {p['verdict']}" for p in simulator["predictions"])
        control = simulator["verdicts_by_rho"].get("lm_stage_beats_probe", {})
        beats = ", ".join(f"rho {r} {v['verdict']}" for r, v in control.items())
        results["summary"] = (
            f"experiment simulated: {len(simulator['rho'])} rho values x {results['rows']} rows, seeds "
            f"{simulator.get('seeds', [results['seed']])}; predictions: {shown}; LM stage beats the probe: "
            f"{beats}; {results['wall_seconds']:.0f} s -> {request.out}/report.md"
        )
        return results
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
