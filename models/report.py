"""`report.md` and its PNG plots from an experiment's results.json (schema in the README).

Every sentence about significance is generated from the CI fields; a section whose results
are absent (no simulator sweep, no distillation) is left out. Plots use matplotlib's
object-oriented Figure (Agg), so nothing touches global pyplot state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

PLOTS = {
    "metrics": "metric_bars.png",
    "calibration": "calibration.png",
    "e2_curve": "e2_curve.png",
    "redundancy": "explained_fraction.png",
    "conversion": "conversion_rate.png",
    "simulator": "simulator.png",
    "joint_curves": "joint_curves.png",
}
RUN_ORDER = ("baseline", "cascade_frozen", "cascade_finetuned", "joint_score", "joint_concat", "joint_gate")
DPI = 110


# ------------------------------------------------------------------------------- formatting


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are written as given (format them first)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: Any, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{float(value):{'+' if signed else ''}.{digits}f}"


def _with_ci(value: Any, ci: Sequence[float] | None, digits: int = 4, signed: bool = False) -> str:
    if value is None:
        return "–"
    if not ci:
        return _num(value, digits, signed)
    return f"{_num(value, digits, signed)} [{_num(ci[0], digits, signed)}, {_num(ci[1], digits, signed)}]"


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def _excludes_zero(ci: Sequence[float] | None) -> bool | None:
    """Whether a difference's CI excludes 0; None without a CI."""
    if not ci:
        return None
    return ci[0] > 0 or ci[1] < 0


def _ordered_runs(runs: Mapping[str, Any]) -> list[str]:
    return [r for r in RUN_ORDER if r in runs] + sorted(r for r in runs if r not in RUN_ORDER)


# ------------------------------------------------------------------------------- plots


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def plot_metric_bars(runs: Mapping[str, Any], path: Path) -> Path:
    """AUC, RIG and GAUC per run, with 95% CI error bars."""
    names = _ordered_runs(runs)
    figure = Figure(figsize=(12, 4))
    for i, metric in enumerate(("auc", "rig", "gauc")):
        axes = figure.add_subplot(1, 3, i + 1)
        values = [runs[n].get(metric) for n in names]
        shown = [n for n, v in zip(names, values, strict=True) if v is not None]
        heights = [float(v) for v in values if v is not None]
        errors = [[0.0, 0.0] for _ in shown]
        for j, name in enumerate(shown):
            ci = runs[name].get(f"{metric}_ci")
            if ci:
                errors[j] = [heights[j] - ci[0], ci[1] - heights[j]]
        axes.bar(range(len(shown)), heights, yerr=list(zip(*errors, strict=True)) or None, capsize=4)
        axes.set_xticks(range(len(shown)), shown, rotation=35, ha="right")
        axes.set_title(metric.upper())
        if heights:  # zoom on the values: AUC differences between runs are small
            lows = [h - e[0] for h, e in zip(heights, errors, strict=True)]
            highs = [h + e[1] for h, e in zip(heights, errors, strict=True)]
            pad = 0.1 * (max(highs) - min(lows)) or 0.01
            axes.set_ylim(min(lows) - pad, max(highs) + pad)
    return _save(figure, path)


def plot_calibration(runs: Mapping[str, Any], path: Path) -> Path:
    """Observed against predicted CTR per run (equal-impression bins), with the diagonal."""
    figure = Figure(figsize=(5.5, 5))
    axes = figure.add_subplot(1, 1, 1)
    top = 0.0
    for name in _ordered_runs(runs):
        curve = (runs[name].get("calibration") or {}).get("curve") or []
        predicted = [b["predicted"] for b in curve]
        observed = [b["observed"] for b in curve]
        if curve:
            axes.plot(predicted, observed, marker="o", markersize=3, label=name)
            top = max(top, *predicted, *observed)
    axes.plot([0, top], [0, top], color="grey", linestyle="--", label="calibrated")
    axes.locator_params(nbins=5)  # CTR tick labels are long
    axes.set_xlabel("predicted CTR")
    axes.set_ylabel("observed CTR")
    axes.legend(fontsize=8)
    return _save(figure, path)


def plot_e2_curve(curve: Mapping[str, Any], path: Path) -> Path:
    """Incremental ΔAUC and ΔRIG against standalone AUC across E2's checkpoints."""
    points = curve["points"]
    figure = Figure(figsize=(10, 4))
    for i, metric in enumerate(("delta_auc", "delta_rig")):
        axes = figure.add_subplot(1, 2, i + 1)
        x = [p["standalone_auc"] for p in points]
        y = [p[metric] for p in points]
        axes.plot(x, y, marker="o")
        for p in points:
            axes.annotate(str(p["checkpoint"]), (p["standalone_auc"], p[metric]), fontsize=8)
        chosen = [p for p in points if p.get("chosen")]
        if chosen:
            axes.scatter(
                [p["standalone_auc"] for p in chosen],
                [p[metric] for p in chosen],
                marker="*",
                s=200,
                color="red",
                zorder=3,
                label="chosen",
            )
            axes.legend()
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set_xlabel("standalone AUC")
        axes.set_ylabel(("ΔAUC" if metric == "delta_auc" else "ΔRIG") + " of E0 + feature over E0")
    return _save(figure, path)


def plot_explained_fraction(redundancy: Mapping[str, Any], path: Path) -> Path:
    """Held-out R² of each feature from E0's inputs and from E0's representation."""
    names = list(redundancy)
    figure = Figure(figsize=(max(6, 1.2 * len(names)), 4))
    axes = figure.add_subplot(1, 1, 1)
    width = 0.4
    for offset, key, label in (
        (-width / 2, "explained_fraction", "from E0's inputs"),
        (width / 2, "explained_fraction_representation", "from E0's representation"),
    ):
        values = [redundancy[n].get(key) for n in names]
        axes.bar(
            [i + offset for i in range(len(names))],
            [float("nan") if v is None else v for v in values],
            width,
            label=label,
        )
    axes.set_xticks(range(len(names)), names, rotation=35, ha="right")
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_ylabel("held-out R² (explained fraction)")
    axes.legend()
    return _save(figure, path)


def plot_conversion(distillation: Mapping[str, Any], path: Path) -> Path:
    """Conversion rate (AUC and RIG) against student layers, one line per method."""
    figure = Figure(figsize=(10, 4))
    methods = sorted({entry["method"] for entry in distillation.values()})
    for i, metric in enumerate(("conversion_auc", "conversion_rig")):
        axes = figure.add_subplot(1, 2, i + 1)
        for method in methods:
            entries = sorted(
                (e for e in distillation.values() if e["method"] == method and e.get(metric) is not None),
                key=lambda e: e["layers"],
            )
            axes.plot([e["layers"] for e in entries], [e[metric] for e in entries], marker="o", label=method)
        axes.axhline(1, color="grey", linestyle="--", linewidth=0.8)
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set_xticks(sorted({e["layers"] for e in distillation.values()}))
        axes.set_xlabel("student layers")
        axes.set_ylabel(f"conversion rate ({metric.split('_')[1].upper()})")
        axes.legend()
    return _save(figure, path)


def plot_joint_curves(runs: Mapping[str, Any], path: Path) -> Path:
    """Validation log loss against training steps for each joint run, E0's best as a line."""
    joint = [n for n in _ordered_runs(runs) if runs[n].get("valid_curve")]
    figure = Figure(figsize=(5 * len(joint), 4))
    baseline = (runs.get("baseline") or {}).get("best_valid_logloss")
    for i, name in enumerate(joint):
        axes = figure.add_subplot(1, len(joint), i + 1)
        curve = runs[name]["valid_curve"]
        for stage in dict.fromkeys(point["stage"] for point in curve):
            points = [p for p in curve if p["stage"] == stage]
            axes.plot(
                [p["step"] for p in points], [p["valid_logloss"] for p in points], marker="o", label=stage
            )
        if baseline is not None:
            axes.axhline(baseline, color="grey", linestyle="--", label="E0 best")
        axes.set_title(name)
        axes.set_xlabel("training step")
        axes.set_ylabel("validation log loss")
        axes.legend(fontsize=8)
    return _save(figure, path)


SWEEP_MEASURES = {
    "explained_fraction": "explained fraction (E0 inputs)",
    "explained_fraction_representation": "explained fraction (E0 representation)",
    "delta_auc": "ΔAUC over E0",
    "delta_rig": "ΔRIG over E0",
}


def simulator_series(simulator: Mapping[str, Any]) -> dict[str, dict[str, list[float | None]]]:
    """{measure: {feature: [value per rho]}} from the sweep's `per_rho[f"{rho:g}"]["redundancy"]`."""
    per_rho = [simulator["per_rho"][f"{float(rho):g}"].get("redundancy") or {} for rho in simulator["rho"]]
    features = list(dict.fromkeys(feature for measures in per_rho for feature in measures))
    return {
        measure: {f: [(measures.get(f) or {}).get(measure) for measures in per_rho] for f in features}
        for measure in SWEEP_MEASURES
    }


def plot_simulator(simulator: Mapping[str, Any], path: Path) -> Path:
    """Each redundancy measure of each feature against the simulator's redundancy knob ρ."""
    series = simulator_series(simulator)
    figure = Figure(figsize=(10, 8))
    for i, (measure, label) in enumerate(SWEEP_MEASURES.items()):
        axes = figure.add_subplot(2, 2, i + 1)
        for feature, values in series[measure].items():
            y = [float("nan") if v is None else v for v in values]
            axes.plot(simulator["rho"], y, marker="o", label=feature)
        axes.set_xlabel("ρ (how much of the text effect the IDs already carry)")
        axes.set_ylabel(label)
        axes.legend(fontsize=7)
    return _save(figure, path)


# ------------------------------------------------------------------------------- sections


def _runs_section(runs: Mapping[str, Any]) -> list[str]:
    rows = []
    for name in _ordered_runs(runs):
        run = runs[name]
        calibration = run.get("calibration") or {}
        epochs = "–" if run.get("epochs") is None else f"{run['epochs']} ({run.get('best_epoch', '–')})"
        rows.append(
            [
                name,
                _with_ci(run.get("auc"), run.get("auc_ci")),
                _with_ci(run.get("gauc"), run.get("gauc_ci")),
                _num(run.get("logloss"), 5),
                _with_ci(run.get("rig"), run.get("rig_ci")),
                _num(calibration.get("ratio"), 3),
                _num(calibration.get("ece"), 4),
                _with_ci(run.get("delta_auc_vs_baseline"), run.get("delta_auc_ci"), signed=True),
                _with_ci(run.get("delta_rig_vs_baseline"), run.get("delta_rig_ci"), signed=True),
                _with_ci(run.get("delta_gauc"), run.get("delta_gauc_ci"), signed=True),
                run.get("layers") if run.get("layers") is not None else "–",
                epochs,
                _num(run.get("wall_seconds"), 0),
            ]
        )
    header = ["run", "AUC [95% CI]", "GAUC [95% CI]", "log loss", "RIG [95% CI]", "calib. ratio", "ECE"]
    header += ["ΔAUC vs E0 [95% CI]", "ΔRIG vs E0 [95% CI]", "ΔGAUC [95% CI]", "LM layers", "epochs (best)"]
    return ["## Runs", "", markdown_table([*header, "wall s"], rows), ""]


def _joint_stages_section(runs: Mapping[str, Any]) -> list[str]:
    """Per joint run and stage: steps, validation log loss at the stage's start and at its best."""
    baseline = (runs.get("baseline") or {}).get("best_valid_logloss")
    rows = []
    for name in _ordered_runs(runs):
        for stage in runs[name].get("stages") or []:
            gain = None if baseline is None else stage["best_valid_logloss"] - baseline
            rows.append(
                [
                    name,
                    stage["name"],
                    stage["steps"],
                    _num(stage["start_valid_logloss"], 6),
                    _num(stage["best_valid_logloss"], 6),
                    stage["best_step"],
                    _num(gain, 6, signed=True),
                ]
            )
    if not rows:
        return []
    header = ["run", "stage", "steps", "start valid log loss", "best valid log loss", "best at step"]
    intro = (
        "Validation log loss of each joint run by stage (`lm`: E0's tower frozen; `all`: everything trains)"
    )
    if baseline is not None:
        intro += f"; E0's best is {_num(baseline, 6)}"
    return [
        "### Joint training stages",
        "",
        intro + ".",
        "",
        markdown_table([*header, "best − E0"], rows),
        "",
        f"![validation log loss per joint run]({PLOTS['joint_curves']})",
        "",
    ]


def significance_statements(runs: Mapping[str, Any]) -> list[str]:
    """One line per run and metric whose difference from E0 has a CI, read from that CI."""
    lines = []
    for name in _ordered_runs(runs):
        run = runs[name]
        for metric, value_key, ci_key in (
            ("AUC", "delta_auc_vs_baseline", "delta_auc_ci"),
            ("RIG", "delta_rig_vs_baseline", "delta_rig_ci"),
            ("GAUC", "delta_gauc", "delta_gauc_ci"),
        ):
            ci, value = run.get(ci_key), run.get(value_key)
            verdict = _excludes_zero(ci)
            if verdict is None or value is None:
                continue
            if verdict:
                direction = "better" if value > 0 else "worse"
                lines.append(
                    f"- {name}: {metric} significantly {direction} than E0, "
                    f"{_with_ci(value, ci, signed=True)} (the 95% CI excludes 0)."
                )
            else:
                lines.append(
                    f"- {name}: {metric} not significantly different from E0, "
                    f"{_with_ci(value, ci, signed=True)}."
                )
    return lines


def _redundancy_section(redundancy: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            name,
            m.get("kind", "–"),
            _num(m.get("standalone_auc")),
            _with_ci(m.get("delta_auc"), m.get("delta_auc_ci"), signed=True),
            _with_ci(m.get("delta_rig"), m.get("delta_rig_ci"), signed=True),
            _num(m.get("explained_fraction"), 3),
            _num(m.get("explained_fraction_representation"), 3),
            _num(m.get("cka"), 3),
        ]
        for name, m in redundancy.items()
    ]
    header = ["feature", "kind", "standalone AUC", "ΔAUC [95% CI]", "ΔRIG [95% CI]"]
    header += ["explained (E0 inputs)", "explained (E0 representation)", "CKA vs E0"]
    return [
        "## Redundancy",
        "",
        "Explained fraction: held-out R² of a ridge probe predicting the feature (its top principal "
        "components for an embedding) from E0's inputs or E0's penultimate layer, weighted by "
        "impressions; it is negative when the probe does worse than the mean.",
        "",
        markdown_table(header, rows),
        "",
        f"![explained fraction per feature]({PLOTS['redundancy']})",
        "",
    ]


def _e2_section(curve: Mapping[str, Any]) -> list[str]:
    rows = [
        [
            p["checkpoint"],
            _num(p["standalone_auc"]),
            _num(p["delta_auc"], signed=True),
            _num(p["delta_rig"], signed=True),
            "yes" if p.get("chosen") else "",
        ]
        for p in curve["points"]
    ]
    lines = ["## E2: standalone AUC against incremental gain", ""]
    lines += [markdown_table(["checkpoint", "standalone AUC", "ΔAUC", "ΔRIG", "chosen"], rows), ""]
    if "peak_auc_checkpoint" in curve:
        answer = "is" if curve["peak_auc_is_best_feature"] else "is not"
        lines.append(
            f"The checkpoint with peak standalone AUC ({curve['peak_auc_checkpoint']}) {answer} the one "
            f"with the best incremental ΔAUC ({curve['best_delta_auc_checkpoint']}); "
            f"by ΔRIG the best is {curve['best_delta_rig_checkpoint']}."
        )
    else:
        lines.append(
            "The checkpoint with peak standalone AUC "
            + ("gives" if curve["peak_auc_is_best_feature"] else "does not give")
            + " the best incremental ΔAUC."
        )
    return [*lines, "", f"![E2 curve]({PLOTS['e2_curve']})", ""]


def _distillation_section(distillation: Mapping[str, Any], teacher: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Distillation", ""]
    if teacher:
        lines += [
            f"Teacher: run {teacher.get('run', '–')}, fusion {teacher.get('fusion', '–')}, "
            f"{teacher.get('layers', '–')} layers, AUC {_num(teacher.get('auc'))}, "
            f"RIG {_num(teacher.get('rig'))}. "
            "Conversion rate = student gain over E0 / teacher gain over E0.",
            "",
        ]
    entries = sorted(distillation.items(), key=lambda item: (item[1]["method"], item[1]["layers"]))
    rows = [
        [
            name,
            e["method"],
            e["layers"],
            _num(e.get("auc")),
            _num(e.get("rig")),
            _num(e.get("gauc")),
            _with_ci(e.get("delta_auc"), e.get("delta_auc_ci"), signed=True),
            _num(e.get("delta_rig"), signed=True),
            _num(e.get("conversion_auc"), 2),
            _num(e.get("conversion_rig"), 2),
            _num(e.get("rows_per_s"), 0),
            _num(e.get("teacher_rows_per_s"), 0),
        ]
        for name, e in entries
    ]
    header = ["student", "method", "layers", "AUC", "RIG", "GAUC", "ΔAUC [95% CI]", "ΔRIG"]
    header += ["conversion (AUC)", "conversion (RIG)", "rows/s", "teacher rows/s"]
    return [*lines, markdown_table(header, rows), "", f"![conversion rate]({PLOTS['conversion']})", ""]


def _simulator_section(simulator: Mapping[str, Any]) -> list[str]:
    series = simulator_series(simulator)
    header = ["feature", *(f"ρ={float(rho):g}" for rho in simulator["rho"])]
    lines = ["## Simulator sweep", ""]
    for measure, title in SWEEP_MEASURES.items():
        rows = [[feature, *(_num(v) for v in values)] for feature, values in series[measure].items()]
        lines += [f"**{title}** by ρ:", "", markdown_table(header, rows), ""]
    trends = simulator.get("trends") or {}
    if trends:
        rows = [
            [
                name,
                _num(t.get("spearman"), 2),
                "yes" if t.get("rises") else "no",
                "yes" if t.get("falls") else "no",
            ]
            for name, t in trends.items()
        ]
        lines += [
            "Trend against ρ:",
            "",
            markdown_table(["feature:measure", "Spearman", "rises", "falls"], rows),
            "",
        ]
    return [*lines, f"![simulator sweep]({PLOTS['simulator']})", ""]


# ------------------------------------------------------------------------------- report


def write_report(results: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """Write report.md and the PNGs for the sections `results` has; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    runs = results.get("runs") or {}
    facts = [f"{key} {results[key]}" for key in ("split", "seed", "rows") if key in results]
    facts.append("quick run" if results.get("quick") else "full run")
    if results.get("wall_seconds") is not None:
        facts.append(f"wall time {_num(results['wall_seconds'], 0)} s")
    lines = [
        f"# nlpctr experiment: {results.get('dataset', '?')}",
        "",
        _sentence(", ".join(facts)),
        "",
    ]
    if runs:
        lines += _runs_section(runs)
        written.append(plot_metric_bars(runs, out_dir / PLOTS["metrics"]))
        lines += [f"![AUC, RIG and GAUC per run with 95% CIs]({PLOTS['metrics']})", ""]
        if any((run.get("calibration") or {}).get("curve") for run in runs.values()):
            written.append(plot_calibration(runs, out_dir / PLOTS["calibration"]))
            lines += [f"![calibration curves]({PLOTS['calibration']})", ""]
        stages = _joint_stages_section(runs)
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
    if results.get("redundancy"):
        lines += _redundancy_section(results["redundancy"])
        written.append(plot_explained_fraction(results["redundancy"], out_dir / PLOTS["redundancy"]))
    if (results.get("e2_curve") or {}).get("points"):
        lines += _e2_section(results["e2_curve"])
        written.append(plot_e2_curve(results["e2_curve"], out_dir / PLOTS["e2_curve"]))
    if results.get("distillation"):
        lines += _distillation_section(results["distillation"], results.get("teacher"))
        written.append(plot_conversion(results["distillation"], out_dir / PLOTS["conversion"]))
    if results.get("simulator"):
        lines += _simulator_section(results["simulator"])
        written.append(plot_simulator(results["simulator"], out_dir / PLOTS["simulator"]))
    if results.get("timings"):
        rows = [[stage, _num(seconds, 1)] for stage, seconds in results["timings"].items()]
        lines += ["## Timings", "", markdown_table(["stage", "seconds"], rows), ""]
    if results.get("provenance"):
        provenance = json.dumps(results["provenance"], indent=2, sort_keys=True, default=str)
        lines += ["## Provenance", "", "```json", provenance, "```", ""]
    report = out_dir / "report.md"
    staged = report.with_suffix(".md.tmp")
    staged.write_text("\n".join(lines))
    staged.replace(report)
    return [report, *written]
