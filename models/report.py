"""`report.md` and its PNG plots from an experiment's results.json (schema in docs/USAGE.md).

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
    "forest": "paired_differences.png",
    "metrics": "metric_bars.png",
    "calibration": "calibration.png",
    "e2_curve": "e2_curve.png",
    "redundancy": "explained_fraction.png",
    "conversion": "student_feature_gain.png",
    "simulator": "simulator.png",
    "simulator_shares": "simulator_shares.png",
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


SHARE_LABELS = {"rig": "RIG", "auc": "AUC", "gauc": "GAUC"}


def _dig(mapping: Mapping[str, Any] | None, *keys: str) -> Any:
    """mapping[k1][k2]...: None where a level is missing or None."""
    value: Any = mapping
    for key in keys:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _interval_cell(interval: Mapping[str, Any] | None, digits: int = 4, signed: bool = False) -> str:
    """An {estimate, ci} entry as `value [low, high]`."""
    return _with_ci(_dig(interval, "estimate"), _dig(interval, "ci"), digits, signed)


def share_metrics(entries: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metrics the entries' `share_of_text_gain` is given on (simulated: rig, auc; real: gauc, auc)."""
    found: dict[str, None] = {}
    for entry in entries:
        found.update(dict.fromkeys((entry or {}).get("share_of_text_gain") or {}))
    return list(found)


def _share_cell(entry: Mapping[str, Any], metric: str) -> str:
    share = _dig(entry, "share_of_text_gain", metric) or {}
    if share.get("estimate") is None:
        return "–" if not share.get("reason") else "n/a"
    return _interval_cell(share, digits=2)


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


def forest_rows(
    redundancy: Mapping[str, Any], claims: Sequence[Mapping[str, Any]]
) -> list[tuple[str, float, tuple[float, float]]]:
    """(label, ΔAUC, CI) of every feature's gain over E0, then of every claim's paired difference."""
    rows = [
        (f"{name} − E0", float(m["delta_auc"]), (float(m["delta_auc_ci"][0]), float(m["delta_auc_ci"][1])))
        for name, m in redundancy.items()
        if m.get("delta_auc") is not None and m.get("delta_auc_ci")
    ]
    rows += [(c["id"], float(c["estimate"]), (float(c["ci"][0]), float(c["ci"][1]))) for c in claims]
    return rows


def plot_forest(redundancy: Mapping[str, Any], claims: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Paired differences with their 95% CIs: each feature's gain over E0, then the claims.

    Paired CIs, unlike the CIs of absolute metrics, show the differences the test can resolve.
    """
    rows = forest_rows(redundancy, claims)
    figure = Figure(figsize=(8, 0.32 * len(rows) + 1.4))
    axes = figure.add_subplot(1, 1, 1)
    for y, (_, estimate, (low, high)) in enumerate(reversed(rows)):
        color = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:grey"
        axes.errorbar(
            estimate, y, xerr=[[estimate - low], [high - estimate]], fmt="o", color=color, capsize=3
        )
    axes.axvline(0, color="black", linewidth=0.8)
    axes.set_yticks(range(len(rows)), [label for label, _, _ in reversed(rows)], fontsize=8)
    axes.set_xlabel("ΔAUC (paired group bootstrap, 95% CI)")
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
    """Each student's feature gain over E0 (ΔAUC, 95% CI) against its layers, one line per method:
    what the conversion rate divides, shown even when there is nothing to distil."""
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot(1, 1, 1)
    for offset, method in enumerate(sorted({entry["method"] for entry in distillation.values()})):
        entries = sorted(
            (
                e
                for e in distillation.values()
                if e["method"] == method and e.get("feature_delta_auc") is not None
            ),
            key=lambda e: e["layers"],
        )
        x = [e["layers"] + 0.06 * (offset - 1) for e in entries]
        y = [e["feature_delta_auc"] for e in entries]
        cis = [e.get("feature_delta_auc_ci") or [v, v] for e, v in zip(entries, y, strict=True)]
        errors = [
            [v - ci[0] for v, ci in zip(y, cis, strict=True)],
            [ci[1] - v for v, ci in zip(y, cis, strict=True)],
        ]
        axes.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=method)
    axes.axhline(0, color="grey", linewidth=0.8)
    axes.set_xticks(sorted({e["layers"] for e in distillation.values()}))
    axes.set_xlabel("student layers")
    axes.set_ylabel("feature ΔAUC over E0 (95% CI)")
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
    header.append("wall s")
    shares = share_metrics([runs[name] for name in _ordered_runs(runs)])
    for row, name in zip(rows, _ordered_runs(runs), strict=True):
        row += [_share_cell(runs[name], metric) for metric in shares]
    header += [f"share ({SHARE_LABELS.get(m, m)}) [95% CI]" for m in shares]
    lines = ["## Runs", "", markdown_table(header, rows), ""]
    if shares:
        lines += [SHARE_NOTE, ""]
    return lines


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


def claims_section(claims: Sequence[Mapping[str, Any]]) -> list[str]:
    """The paper's claims first: each a paired ΔAUC with its CI, ΔRIG beside it, and the verdict."""
    rows = [
        [
            c["id"],
            c["statement"],
            _with_ci(c["estimate"], c["ci"], signed=True),
            _with_ci(c.get("delta_rig"), c.get("delta_rig_ci"), signed=True),
            f"**{c['verdict']}**",
        ]
        for c in claims
    ]
    return [
        "## The paper's claims",
        "",
        "Each estimate is a paired difference in test ΔAUC with a group-bootstrap 95% CI; the verdict "
        "follows from the CI alone: *holds* when it excludes 0 on the claimed side, *contradicted* "
        "when it excludes 0 on the other side, *not significant* otherwise.",
        "",
        markdown_table(["claim", "statement", "ΔAUC [95% CI]", "ΔRIG [95% CI]", "verdict"], rows),
        "",
    ]


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
    shares = share_metrics(list(redundancy.values()))
    for row, entry in zip(rows, redundancy.values(), strict=True):
        row += [_share_cell(entry, metric) for metric in shares]
    header += [f"share ({SHARE_LABELS.get(m, m)}) [95% CI]" for m in shares]
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
            f"Teacher: run {teacher.get('run', '–')} ({teacher.get('selected_by', 'configured')}), "
            f"{teacher.get('layers', '–')} layers; end to end AUC {_num(teacher.get('auc'))}, RIG "
            f"{_num(teacher.get('rig'))}; as a feature added to E0, ΔAUC "
            + _with_ci(teacher.get("feature_delta_auc"), teacher.get("feature_delta_auc_ci"), signed=True)
            + ". "
            "Each student is judged as a feature added to E0; conversion rate = the student feature's "
            "gain over E0 / the teacher feature's gain, with a paired group-bootstrap CI.",
            "",
        ]
        if teacher.get("nothing_to_distil"):
            lines += [
                "**Nothing to distil:** the teacher feature's gain over E0 has a CI that includes 0 "
                "(or lies below it), so no conversion rate is given.",
                "",
            ]
    entries = sorted(distillation.items(), key=lambda item: (item[1]["method"], item[1]["layers"]))
    rows = [
        [
            name,
            e["method"],
            e["layers"],
            _num(e.get("auc")),
            _with_ci(e.get("delta_auc"), e.get("delta_auc_ci"), signed=True),
            _with_ci(e.get("feature_delta_auc"), e.get("feature_delta_auc_ci"), signed=True),
            _num(e.get("feature_delta_rig"), signed=True),
            _with_ci(e.get("conversion_auc"), e.get("conversion_auc_ci"), 2),
            _with_ci(e.get("conversion_rig"), e.get("conversion_rig_ci"), 2),
            _num(e.get("rows_per_s"), 0),
            _num(e.get("teacher_rows_per_s"), 0),
        ]
        for name, e in entries
    ]
    header = ["student", "method", "layers", "AUC", "ΔAUC end to end [95% CI]", "feature ΔAUC [95% CI]"]
    header += ["feature ΔRIG", "conversion (AUC) [95% CI]", "conversion (RIG) [95% CI]", "rows/s"]
    header += ["teacher rows/s"]
    return [
        *lines,
        markdown_table(header, rows),
        "",
        f"![student feature gain over E0]({PLOTS['conversion']})",
        "",
    ]


def _predictions_section(predictions: Sequence[Mapping[str, Any]]) -> list[str]:
    """The sweep's stated predictions first: each part's values against ρ, its test and verdict."""
    lines = [
        "## Predictions",
        "",
        "Trends: exact one-sided permutation test of Spearman's correlation with ρ (p ≤ 0.05). "
        "Joint vs E2: the paired ΔRIG of the two features over E0 (group bootstrap, 95% CI).",
        "",
    ]
    for prediction in predictions:
        lines += [f"**{prediction['id']}**: {prediction['statement']}: **{prediction['verdict']}**", ""]
        rows = []
        for part, detail in prediction["parts"].items():
            if "values" in detail:
                values = ", ".join(_num(v) for v in detail["values"])
                test = f"Spearman {_num(detail['spearman'], 2)}, p {_num(detail['p'], 3)}"
                if detail.get("ci_at_last_rho"):
                    low, high = (_num(v, signed=True) for v in detail["ci_at_last_rho"])
                    test += f"; ΔRIG at the last ρ [{low}, {high}]"
                rows.append([part, values, test, detail["verdict"]])
            else:
                pair = f"{detail['joint_feature']} − {detail['finetuned_feature']}"
                estimate = _with_ci(detail["delta_rig"], detail["delta_rig_ci"], signed=True)
                rows.append([f"ρ={part}", pair, f"ΔRIG {estimate}", detail["verdict"]])
        lines += [markdown_table(["part", "values / pair", "test", "verdict"], rows), ""]
    return lines


def _simulator_section(simulator: Mapping[str, Any]) -> list[str]:
    series = simulator_series(simulator)
    header = ["feature", *(f"ρ={float(rho):g}" for rho in simulator["rho"])]
    lines = ["## Simulator sweep", ""]
    if simulator.get("predictions"):
        lines += _predictions_section(simulator["predictions"])
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
    lines += _simulator_ceilings_section(simulator)
    return [*lines, f"![simulator sweep]({PLOTS['simulator']})", ""]


SHARE_NOTE = (
    "Share = (model − E0) / (ceiling gap): on simulated data the gap is the Bayes oracle − the "
    "no-text oracle (the achievable text gain); on real data the split-half ceiling − E0. "
    "n/a: not meaningful here (see Ceilings). Paired group bootstrap, the draws of the Δ CIs."
)


def _ceilings_section(ceilings: Mapping[str, Any], runs: Mapping[str, Any]) -> list[str]:
    lines = ["## Ceilings", ""]
    base = runs.get("baseline") or {}
    if ceilings.get("kind") == "simulated":
        lines += [
            "From the simulator's truth on the test split: the Bayes oracle scores each row with its "
            "true click probability, the no-text oracle with sigmoid(true logit − text effect); the "
            "text gain is the gap between them, the most any text feature can add.",
            "",
        ]
        rows = []
        for name, card in (
            ("Bayes oracle", ceilings["oracle"]),
            ("no-text oracle", ceilings["no_text_oracle"]),
        ):
            rows.append(
                [
                    name,
                    _with_ci(card.get("auc"), card.get("auc_ci")),
                    _num(card.get("logloss"), 5),
                    _with_ci(card.get("rig"), card.get("rig_ci")),
                    _with_ci(card.get("gauc"), card.get("gauc_ci")),
                ]
            )
        if base:
            rows.append(
                [
                    "E0 (baseline)",
                    _with_ci(base.get("auc"), base.get("auc_ci")),
                    _num(base.get("logloss"), 5),
                    _with_ci(base.get("rig"), base.get("rig_ci")),
                    _with_ci(base.get("gauc"), base.get("gauc_ci")),
                ]
            )
        gain = ceilings.get("text_gain") or {}
        rows.append(
            [
                "text gain (oracle − no-text)",
                _interval_cell(gain.get("auc"), signed=True),
                _interval_cell(gain.get("logloss"), 5, signed=True),
                _interval_cell(gain.get("rig"), signed=True),
                _interval_cell(gain.get("gauc"), signed=True),
            ]
        )
        header = ["scores", "AUC [95% CI]", "log loss", "RIG [95% CI]", "GAUC [95% CI]"]
        lines += [markdown_table(header, rows), ""]
        if ceilings.get("e0_rig_over_no_text_oracle_rig") is not None:
            near = "is" if ceilings.get("e0_near_no_text_oracle") else "is not"
            lines.append(
                f"E0's RIG is {_num(ceilings['e0_rig_over_no_text_oracle_rig'], 3)} × the no-text oracle's: "
                f"E0 {near} near its no-text oracle ({ceilings.get('e0_near_criterion', '')})."
            )
        e0_share = ceilings.get("e0_share_of_text_gain") or {}
        if e0_share:
            cells = ", ".join(f"{SHARE_LABELS.get(m, m)} {_interval_cell(v, 2)}" for m, v in e0_share.items())
            lines.append(f"E0's own share of the text gain (E0 − no-text oracle, over the gap): {cells}.")
        return [*lines, ""]
    half = ceilings.get("split_half") or {}
    lines += [
        "No truth on real data: the split-half ceiling splits each item's test impressions in two "
        "(clicks drawn hypergeometrically), scores one half by the other half's CTR (shrunk toward "
        "its mean) and measures AUC and GAUC there. It includes every non-text cause of an item's "
        "CTR, and a half's CTR is noisy, so it is a rough ceiling, not a bound.",
        "",
    ]
    rows = [
        [
            f"split half (seed {half.get('seed')})",
            _with_ci(half.get("auc"), half.get("auc_ci")),
            _with_ci(half.get("gauc"), half.get("gauc_ci")),
        ],
        [
            "in sample (optimistic)",
            _num(_dig(half, "in_sample", "auc")),
            _num(_dig(half, "in_sample", "gauc")),
        ],
        ["random scores", _num(_dig(half, "random", "auc")), _num(_dig(half, "random", "gauc"))],
    ]
    if base:
        rows.append(
            [
                "E0 (baseline)",
                _with_ci(base.get("auc"), base.get("auc_ci")),
                _with_ci(base.get("gauc"), base.get("gauc_ci")),
            ]
        )
    gap = ceilings.get("e0_gap") or {}
    if gap:
        gap_cells = [_interval_cell(gap.get(m), signed=True) for m in ("auc", "gauc")]
        rows.append(["gap (split half − E0)", *gap_cells])
    lines += [markdown_table(["scores", "AUC [95% CI]", "GAUC [95% CI]"], rows), ""]
    applies = "applies" if half.get("applicable") else "does not apply"
    lines.append(
        f"Items: {half.get('item', '–')}, {half.get('items', '–')} of them; "
        f"{_num(100 * (half.get('splittable_impression_share') or 0.0), 1)}% of the test impressions are on "
        f"items shown at least twice; the ceiling {applies}."
    )
    for metric, verdict in (ceilings.get("meaningful") or {}).items():
        if verdict is not True:
            reason = verdict.get("reason") if isinstance(verdict, Mapping) else ""
            lines.append(f"No share of the {metric.upper()} gap: {reason}.")
    return [*lines, ""]


def simulator_shares(simulator: Mapping[str, Any]) -> dict[str, dict[str, list[float | None]]]:
    """{metric: {feature or E0: [share of the text gain per rho]}}; E0's is its own share over the
    no-text oracle (what its IDs already know of the text)."""
    out: dict[str, dict[str, list[float | None]]] = {}
    entries = [simulator["per_rho"][f"{float(rho):g}"] for rho in simulator["rho"]]
    features = list(dict.fromkeys(f for e in entries for f in (e.get("redundancy") or {})))
    for metric in ("rig", "auc"):
        series: dict[str, list[float | None]] = {}
        e0 = [_dig(e, "ceilings", "e0_share_of_text_gain", metric, "estimate") for e in entries]
        if any(v is not None for v in e0):
            series["E0 itself (vs no-text oracle)"] = e0
        for feature in features:
            values = [
                _dig(e, "redundancy", feature, "share_of_text_gain", metric, "estimate") for e in entries
            ]
            if any(v is not None for v in values):
                series[feature] = values
        if series:
            out[metric] = series
    return out


def plot_simulator_shares(simulator: Mapping[str, Any], path: Path) -> Path:
    """Each feature's share of the achievable text gain (RIG, AUC) against ρ, and E0's own."""
    series = simulator_shares(simulator)
    figure = Figure(figsize=(10, 4))
    for i, (metric, lines) in enumerate(series.items()):
        axes = figure.add_subplot(1, len(series), i + 1)
        for name, values in lines.items():
            y = [float("nan") if v is None else v for v in values]
            style = {"linestyle": "--", "color": "black"} if name.startswith("E0") else {}
            axes.plot(simulator["rho"], y, marker="o", label=name, **style)
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.axhline(1, color="grey", linestyle=":", linewidth=0.8)
        axes.set_xlabel("ρ (how much of the text effect the IDs already carry)")
        axes.set_ylabel(f"share of the text gain ({SHARE_LABELS[metric]})")
        axes.set_title("(E0 + feature − E0) / (oracle − no-text oracle)", fontsize=9)
        axes.legend(fontsize=7)
    return _save(figure, path)


def _simulator_ceilings_section(simulator: Mapping[str, Any]) -> list[str]:
    entries = {f"{float(rho):g}": simulator["per_rho"][f"{float(rho):g}"] for rho in simulator["rho"]}
    if not any(e.get("ceilings") for e in entries.values()):
        return []
    rows = []
    for rho, entry in entries.items():
        c = entry.get("ceilings") or {}
        o, n = c.get("oracle") or {}, c.get("no_text_oracle") or {}
        e0 = (entry.get("runs") or {}).get("baseline") or {}
        near = entry.get("e0_near_no_text_oracle")
        rows.append(
            [
                rho,
                _num(o.get("auc")),
                _num(n.get("auc")),
                _num(e0.get("auc")),
                _num(o.get("rig")),
                _num(n.get("rig")),
                _num(e0.get("rig")),
                _num(entry.get("e0_rig_over_no_text_oracle_rig"), 3),
                "–" if near is None else ("yes" if near else "no"),
            ]
        )
    header = ["ρ", "oracle AUC", "no-text AUC", "E0 AUC", "oracle RIG", "no-text RIG", "E0 RIG"]
    header += ["E0 RIG / no-text RIG", "E0 near no-text oracle"]
    lines = ["**Ceilings** by ρ (test split):", "", markdown_table(header, rows), ""]
    shares = simulator_shares(simulator)
    header = ["feature", *(f"ρ={rho}" for rho in entries)]
    for metric, series in shares.items():
        table = [[name, *(_num(v, 2) for v in values)] for name, values in series.items()]
        lines += [
            f"**Share of the text gain ({SHARE_LABELS[metric]})** by ρ:",
            "",
            markdown_table(header, table),
            "",
        ]
    if shares:
        lines += [f"![share of the text ceiling against ρ]({PLOTS['simulator_shares']})", ""]
    return lines


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
    if results.get("claims"):
        lines += claims_section(results["claims"])
        written.append(
            plot_forest(results.get("redundancy") or {}, results["claims"], out_dir / PLOTS["forest"])
        )
        lines += [f"![paired differences with 95% CIs]({PLOTS['forest']})", ""]
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
    if results.get("ceilings"):
        lines += _ceilings_section(results["ceilings"], runs)
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
        if simulator_shares(results["simulator"]):
            written.append(plot_simulator_shares(results["simulator"], out_dir / PLOTS["simulator_shares"]))
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
