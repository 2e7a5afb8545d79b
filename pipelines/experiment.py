"""The whole experiment protocol in one command (DESIGN.md, "Experiment protocol").

    nlpctr experiment --dataset NAME [--quick] [--seed S] --out DIR [--config FILE] [--no-progress]
                      [--device auto|cpu|cuda[:N]] [--precision bf16|fp16|fp32]
    nlpctr experiment --dataset simulated [--rho 0,0.5,1] [--rows N] [--quick] --out DIR

prepare (Beam) -> CTR history (Beam) -> frozen embeddings (Beam RunInference) -> Feast apply and
materialize -> E0 baseline, E1 cascade-frozen, E2 cascade-finetuned, E3 joint per fusion (each
`nlpctr train`, through Feast) -> E4 distillation (SuKD, feature-KD, no-KD per student depth) ->
redundancy of every NLP feature. Writes `DIR/results.json`, `DIR/report.md` and PNG plots; data
under `DIR/data/`, runs under `DIR/runs/`. Sizes come from `models/configs/experiment.yaml`
(`--quick`: its `quick:` section, a small LM and few steps). `--device`/`--precision` (or the
protocol's `device:`/`precision:`) place every job and run (`models/device.py`); results.json
records them under `provenance.placement`.

DIR must be new, empty, or an earlier experiment's folder (marked by a hidden `.nlpctr-output`
file, or its results.json); anything else is refused before any work starts.

`--dataset simulated` runs the redundancy sweep instead: for each rho a simulated log
(`nlpctr data simulate`), the protocol without E4, then the trend of each measure against rho,
which must follow the known redundancy (`DIR/rho-<r>/` per value, the sweep in `DIR/results.json`).

Redundancy increments (E0 + one feature) are trained in memory on the cascade-frozen training
frame, the LM features joined on their (query_text_id, ad_text_id) key: each LM feature has one
row per key, stamped at the key's first impression, so this join gives what Feast's
point-in-time join gives (E2's chosen checkpoint, trained both ways, is checked to agree).

This module is the command (flags, protocol sizes, the summary); one dataset's protocol is
`pipelines/protocol.py`, E4 `pipelines/distillation.py`, the sweep `pipelines/rho_sweep.py`, and
the analysis they call lives in `models/` (`increments`, `nlp_features`, `redundancy`, `claims`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from nlpctr.errors import UserError
from nlpctr.models.config import deep_merge
from nlpctr.pipelines.ownership import claim_output_dir
from nlpctr.pipelines.protocol import BASELINE_RUN, JOB, experiment_placement, run_protocol
from nlpctr.pipelines.rho_sweep import SIMULATED, run_sweep
from nlpctr.pipelines.specs import load_spec
from nlpctr.pipelines.train import add_placement_flags

PROTOCOL = Path(__file__).resolve().parents[1] / "models" / "configs" / "experiment.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="nlpctr experiment", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help=f"bundled dataset, spec YAML, or {SIMULATED!r}")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--quick", action="store_true", help="small LM, few steps (minutes on a laptop)")
    parser.add_argument("--seed", type=int, default=0, help="split and training seed")
    parser.add_argument("--config", type=Path, default=None, help="YAML merged over the protocol sizes")
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
    return parser.parse_args(argv)


def load_protocol(quick: bool, config_file: Path | None, simulated: bool = False) -> dict[str, Any]:
    """experiment.yaml (for the sweep, its `simulator.train_config` over `train_config`), its
    `quick:` section when asked, then `--config`."""
    protocol = yaml.safe_load(PROTOCOL.read_text())
    quick_section = protocol.pop("quick")
    if simulated:  # before `quick:`, whose sizes win
        protocol = deep_merge(protocol, {"train_config": protocol["simulator"].get("train_config") or {}})
    if quick:
        protocol = deep_merge(protocol, quick_section)
    if simulated and "fusions" in protocol["simulator"]:  # the sweep's own, quick or not
        protocol["fusions"] = protocol["simulator"]["fusions"]
    if config_file is not None:
        if not config_file.is_file():
            raise UserError(f"--config {config_file} does not exist")
        protocol = deep_merge(protocol, yaml.safe_load(config_file.read_text()) or {})
    students = [int(k) for k in protocol["distill"]["students"]]
    if students and max(students) > int(protocol["joint_lm_layers"]):
        raise UserError(
            f"students of {max(students)} layers need a teacher of at least as many; joint_lm_layers is "
            f"{protocol['joint_lm_layers']}"
        )
    if students and protocol["distill"]["teacher_fusion"] not in ["best", *protocol["fusions"]]:
        raise UserError(f"distill.teacher_fusion must be `best` or one of fusions {protocol['fusions']}")
    return protocol


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """`nlpctr experiment`; returns the results with a one-line `summary`."""
    args = parse_args(argv)
    args.out = args.out.resolve()
    protocol = load_protocol(args.quick, args.config, simulated=args.dataset == SIMULATED)
    if args.dataset != SIMULATED and (args.rho or args.rows or args.impressions_per_row is not None):
        raise UserError(f"--rho, --rows and --impressions-per-row go with --dataset {SIMULATED}")
    experiment_placement(args, protocol)  # a device that is not there: one line, before any work
    # Before any work: --out is new, empty or an earlier experiment's folder (then marked as
    # this job's), and holds neither the spec nor the source log.
    inputs = []
    if args.dataset != SIMULATED:
        spec = load_spec(args.dataset)
        inputs = [spec.spec_path, spec.source.path]
    claim_output_dir(args.out, JOB, inputs=inputs, create=True)
    if args.dataset == SIMULATED:
        results = run_sweep(args, protocol)
        trends = results["simulator"]["trends"]
        shown = ", ".join(f"{k} {v['spearman']:+.2f}" for k, v in trends.items() if k.endswith(":delta_auc"))
        results["summary"] = (
            f"experiment simulated: {len(results['simulator']['rho'])} rho values x {results['rows']} rows; "
            f"Spearman vs rho of ΔAUC: {shown}; {results['wall_seconds']:.0f} s -> {args.out}/results.json"
        )
        return results
    results = run_protocol(args, protocol, args.dataset, args.out)
    runs = results["runs"]
    best = max((k for k in runs if k != BASELINE_RUN), key=lambda k: runs[k]["auc"])
    verdicts = ", ".join(
        f"{c['id']}{'@L' + str(c['detail']['layers']) if 'layers' in c['detail'] else ''} {c['verdict']}"
        for c in results["claims"]
    )
    results["summary"] = (
        f"experiment {results['dataset']}: E0 AUC {runs[BASELINE_RUN]['auc']:.4f}; best {best} "
        f"{runs[best]['auc']:.4f} (ΔAUC {runs[best]['delta_auc_vs_baseline']:+.4f}); "
        f"{len(results['redundancy'])} features measured, {len(results.get('distillation', {}))} students; "
        f"claims: {verdicts}; {results['wall_seconds']:.0f} s -> {args.out}/report.md"
    )
    return results
