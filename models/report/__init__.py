"""`report.md` and its PNG plots from an experiment's results.json (schema in docs/USAGE.md).

Every sentence about significance is generated from the CI fields; a section whose results
are absent (no simulator sweep, no distillation) is left out. Plots use matplotlib's
object-oriented Figure (Agg), so nothing touches global pyplot state.

Here the report is assembled; the sections are written in sections.py (a simulator sweep's in
sweep_sections.py), the plots drawn in plots.py, and what both share (file names, labels,
number formats) is in formatting.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from nlpctr.atomic import write_atomic
from nlpctr.models.report.formatting import PLOTS, markdown_table, num, sentence
from nlpctr.models.report.plots import (
    plot_calibration,
    plot_conversion,
    plot_e2_curve,
    plot_explained_fraction,
    plot_forest,
    plot_joint_curves,
    plot_metric_bars,
    plot_simulator,
    plot_simulator_shares,
    simulator_shares,
)
from nlpctr.models.report.sections import (
    budget_section,
    ceilings_section,
    claims_section,
    controls_section,
    distillation_section,
    e2_section,
    joint_stages_section,
    redundancy_section,
    runs_section,
    significance_statements,
)
from nlpctr.models.report.sweep_sections import simulator_section
from nlpctr.models.results import ExperimentResults
from nlpctr.models.sweep import SweepResults


def write_report(results: ExperimentResults | SweepResults, out_dir: Path) -> list[Path]:
    """Write report.md and the PNGs for the sections `results` has; returns the paths written.

    Args:
        results: an experiment's results.json content (one dataset's protocol or the sweep).
        out_dir: the folder that gets report.md and the plots; created if missing.

    Returns:
        The paths written: report.md first, then the plots.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    runs = results.get("runs") or {}
    facts = [f"{key} {results[key]}" for key in ("split", "seed", "rows") if key in results]
    facts.append("quick run" if results.get("quick") else "full run")
    if results.get("wall_seconds") is not None:
        facts.append(f"wall time {num(results['wall_seconds'], 0)} s")
    lines = [
        f"# nlpctr experiment: {results.get('dataset', '?')}",
        "",
        sentence(", ".join(facts)),
        "",
    ]
    if results.get("claims"):
        lines += claims_section(results["claims"])
        written.append(
            plot_forest(results.get("redundancy") or {}, results["claims"], out_dir / PLOTS["forest"])
        )
        lines += [f"![paired differences with 95% CIs]({PLOTS['forest']})", ""]
    lines += controls_section(results.get("controls") or [])
    if runs:
        lines += runs_section(runs)
        lines += budget_section(runs)
        written.append(plot_metric_bars(runs, out_dir / PLOTS["metrics"]))
        lines += [f"![AUC, RIG and GAUC per run with 95% CIs]({PLOTS['metrics']})", ""]
        if any((run.get("calibration") or {}).get("curve") for run in runs.values()):
            written.append(plot_calibration(runs, out_dir / PLOTS["calibration"]))
            lines += [f"![calibration curves]({PLOTS['calibration']})", ""]
        stages = joint_stages_section(runs)
        if stages:
            lines += stages
            written.append(plot_joint_curves(runs, out_dir / PLOTS["joint_curves"]))
        statements = significance_statements(runs)
        if statements:
            lines += [
                "### What is significant",
                "",
                "Paired group-bootstrap 95% CIs against E0:",
                "",
                *statements,
                "",
            ]
    if results.get("ceilings"):
        lines += ceilings_section(results["ceilings"], runs)
    if results.get("redundancy"):
        lines += redundancy_section(results["redundancy"])
        written.append(plot_explained_fraction(results["redundancy"], out_dir / PLOTS["redundancy"]))
    if (results.get("e2_curve") or {}).get("points"):
        lines += e2_section(results["e2_curve"])
        written.append(plot_e2_curve(results["e2_curve"], out_dir / PLOTS["e2_curve"]))
    if results.get("distillation"):
        lines += distillation_section(results["distillation"], results.get("teacher"))
        written.append(plot_conversion(results["distillation"], out_dir / PLOTS["conversion"]))
    if results.get("simulator"):
        lines += simulator_section(results["simulator"])
        written.append(plot_simulator(results["simulator"], out_dir / PLOTS["simulator"]))
        if simulator_shares(results["simulator"]):
            written.append(plot_simulator_shares(results["simulator"], out_dir / PLOTS["simulator_shares"]))
    if results.get("timings"):
        rows = [[stage, num(seconds, 1)] for stage, seconds in results["timings"].items()]
        lines += ["## Timings", "", markdown_table(["stage", "seconds"], rows), ""]
    if results.get("provenance"):
        provenance = json.dumps(results["provenance"], indent=2, sort_keys=True, default=str)
        lines += ["## Provenance", "", "```json", provenance, "```", ""]
    report = out_dir / "report.md"
    write_atomic(report, "\n".join(lines))
    return [report, *written]
