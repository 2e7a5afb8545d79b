"""The report's PNG plots, drawn on matplotlib's object-oriented Figure (Agg), so nothing
touches global pyplot state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.figure import Figure

from nlpctr.models.ceilings import share_estimate
from nlpctr.models.claims import ClaimRecord
from nlpctr.models.increments import RedundancyMeasure
from nlpctr.models.redundancy import E2Curve
from nlpctr.models.report.formatting import SHARE_LABELS, SWEEP_MEASURES, ordered_runs
from nlpctr.models.results import RunEntry, StudentEntry
from nlpctr.models.sweep import SimulatorSection

DPI = 110


def _save(figure: Figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, metadata={"Software": None})
    return path


def plot_metric_bars(runs: Mapping[str, RunEntry], path: Path) -> Path:
    """AUC, RIG and GAUC per run, with 95% CI error bars."""
    names = ordered_runs(runs)
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
    redundancy: Mapping[str, RedundancyMeasure], claims: Sequence[ClaimRecord]
) -> list[tuple[str, float, tuple[float, float]]]:
    """(label, ΔAUC, CI) of every feature's gain over E0, then of every claim's paired difference."""
    rows = [
        (f"{name} − E0", float(m["delta_auc"]), (float(m["delta_auc_ci"][0]), float(m["delta_auc_ci"][1])))
        for name, m in redundancy.items()
        if m.get("delta_auc") is not None and m.get("delta_auc_ci")
    ]
    rows += [
        (f"{c['id']} ({c.get('form', '–')})", float(c["estimate"]), (float(c["ci"][0]), float(c["ci"][1])))
        for c in claims
    ]
    return rows


def plot_forest(
    redundancy: Mapping[str, RedundancyMeasure], claims: Sequence[ClaimRecord], path: Path
) -> Path:
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


def plot_calibration(runs: Mapping[str, RunEntry], path: Path) -> Path:
    """Observed against predicted CTR per run (equal-impression bins), with the diagonal."""
    figure = Figure(figsize=(5.5, 5))
    axes = figure.add_subplot(1, 1, 1)
    top = 0.0
    for name in ordered_runs(runs):
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


def plot_e2_curve(curve: E2Curve, path: Path) -> Path:
    """Incremental ΔAUC and ΔRIG (each form) against the LM's standalone validation AUC across
    E2's checkpoints; the peak-AUC checkpoint starred."""
    points = curve["points"]
    forms = list(curve.get("forms") or {})
    figure = Figure(figsize=(10, 3.6 * max(len(forms), 1)))
    x = [p["valid_auc_standalone"] for p in points]
    for row, form in enumerate(forms):
        for col, metric in enumerate(("delta_auc", "delta_rig")):
            axes = figure.add_subplot(len(forms), 2, 2 * row + col + 1)
            y = [p[form][metric] for p in points]
            axes.plot(x, y, marker="o")
            for p, xv, yv in zip(points, x, y, strict=True):
                axes.annotate(str(p["checkpoint"]), (xv, yv), fontsize=7)
            chosen = [(xv, yv) for p, xv, yv in zip(points, x, y, strict=True) if p.get("chosen")]
            if chosen:
                axes.scatter(
                    *zip(*chosen, strict=True), marker="*", s=200, color="red", zorder=3, label="peak AUC"
                )
                axes.legend(fontsize=8)
            axes.axhline(0, color="grey", linewidth=0.8)
            axes.set_xlabel("standalone validation AUC of the LM")
            label = "ΔAUC" if metric == "delta_auc" else "ΔRIG"
            axes.set_ylabel(f"{label} of E0 + {form} over E0")
    return _save(figure, path)


def plot_explained_fraction(redundancy: Mapping[str, RedundancyMeasure], path: Path) -> Path:
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


def plot_conversion(distillation: Mapping[str, StudentEntry], path: Path) -> Path:
    """Each student's feature gain over E0 (ΔAUC, 95% CI) against its layers, one line per method,
    one panel per form: what the conversion rate divides, shown even when there is nothing to distil."""
    forms = [f for f in ("score", "vector") if any(f in e for e in distillation.values())]
    figure = Figure(figsize=(6 * max(len(forms), 1), 4))
    methods = sorted({entry["method"] for entry in distillation.values()})
    for panel, form in enumerate(forms):
        axes = figure.add_subplot(1, len(forms), panel + 1)
        for offset, method in enumerate(methods):
            entries = sorted(
                (e for e in distillation.values() if e["method"] == method and form in e),
                key=lambda e: e["layers"],
            )
            x = [e["layers"] + 0.06 * (offset - 1) for e in entries]
            y = [e[form]["feature_delta_auc"] for e in entries]
            cis = [e[form].get("feature_delta_auc_ci") or [v, v] for e, v in zip(entries, y, strict=True)]
            errors = [
                [v - ci[0] for v, ci in zip(y, cis, strict=True)],
                [ci[1] - v for v, ci in zip(y, cis, strict=True)],
            ]
            axes.errorbar(x, y, yerr=errors, marker="o", capsize=3, label=method)
        axes.axhline(0, color="grey", linewidth=0.8)
        axes.set_xticks(sorted({e["layers"] for e in distillation.values()}))
        axes.set_xlabel("student layers")
        axes.set_ylabel(f"feature ΔAUC over E0, {form} form (95% CI)")
        axes.legend()
    return _save(figure, path)


def plot_joint_curves(runs: Mapping[str, RunEntry], path: Path) -> Path:
    """Validation log loss against training steps for each joint run, E0's best as a line."""
    joint = [n for n in ordered_runs(runs) if runs[n].get("valid_curve")]
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


def simulator_series(simulator: SimulatorSection) -> dict[str, dict[str, list[float | None]]]:
    """{measure: {feature: [value per rho]}} from the sweep's `per_rho[f"{rho:g}"]["redundancy"]`."""
    per_rho = [simulator["per_rho"][f"{float(rho):g}"].get("redundancy") or {} for rho in simulator["rho"]]
    features = list(dict.fromkeys(feature for measures in per_rho for feature in measures))
    return {
        measure: {f: [(measures.get(f) or {}).get(measure) for measures in per_rho] for f in features}
        for measure in SWEEP_MEASURES
    }


def plot_simulator(simulator: SimulatorSection, path: Path) -> Path:
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


def simulator_shares(simulator: SimulatorSection) -> dict[str, dict[str, list[float | None]]]:
    """{metric: {feature or E0: [share of the text gain per rho]}}; E0's is its own share over the
    no-text oracle (what its IDs already know of the text)."""
    out: dict[str, dict[str, list[float | None]]] = {}
    entries = [simulator["per_rho"][f"{float(rho):g}"] for rho in simulator["rho"]]
    features = list(dict.fromkeys(f for e in entries for f in (e.get("redundancy") or {})))
    for metric in ("rig", "auc"):
        series: dict[str, list[float | None]] = {}
        e0 = [share_estimate((e.get("ceilings") or {}).get("e0_share_of_text_gain"), metric) for e in entries]
        if any(v is not None for v in e0):
            series["E0 itself (vs no-text oracle)"] = e0
        for feature in features:
            measured = [(e.get("redundancy") or {}).get(feature) or {} for e in entries]
            values = [share_estimate(m.get("share_of_text_gain"), metric) for m in measured]
            if any(v is not None for v in values):
                series[feature] = values
        if series:
            out[metric] = series
    return out


def plot_simulator_shares(simulator: SimulatorSection, path: Path) -> Path:
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
