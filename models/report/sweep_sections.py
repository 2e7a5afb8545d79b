"""The report's sections on a simulator sweep (results.json's `simulator`): the stated
predictions and their verdicts, claims and controls at each ρ and over seeds, each feature's
measures against ρ, and the ceilings by ρ. The report (models/report/__init__.py) places them
after the experiment's own sections (sections.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nlpctr.models.report.formatting import (
    PLOTS,
    SHARE_LABELS,
    SWEEP_MEASURES,
    markdown_table,
    num,
    with_ci,
)
from nlpctr.models.report.plots import simulator_series, simulator_shares
from nlpctr.models.sweep import Prediction, RhoVerdict, SimulatorSection, SpreadAtRho


def predictions_section(predictions: Sequence[Prediction]) -> list[str]:
    """The sweep's stated predictions first: each part's values against ρ, its test and verdict."""
    lines = [
        "## Predictions",
        "",
        "Trends: exact one-sided permutation test of Spearman's correlation with ρ (p ≤ 0.05). "
        "Joint vs E2: the paired ΔRIG of the two features over E0 (group bootstrap, 95% CI).",
        "",
    ]
    for prediction in predictions:
        form = f" ({prediction['form']} form)" if prediction.get("form") else ""
        lines += [f"**{prediction['id']}**{form}: {prediction['statement']}: **{prediction['verdict']}**", ""]
        rows = []
        for part, detail in prediction["parts"].items():
            if "values" in detail:
                values = ", ".join(num(v) for v in detail["values"])
                test = f"Spearman {num(detail['spearman'], 2)}, p {num(detail['p'], 3)}"
                if detail.get("ci_at_last_rho"):
                    low, high = (num(v, signed=True) for v in detail["ci_at_last_rho"])
                    test += f"; ΔRIG at the last ρ [{low}, {high}]"
                rows.append([part, values, test, detail["verdict"]])
            else:
                pair = f"{detail['joint_feature']} − {detail['finetuned_feature']}"
                estimate = with_ci(detail["delta_rig"], detail["delta_rig_ci"], signed=True)
                rows.append([f"ρ={part}", pair, f"ΔRIG {estimate}", detail["verdict"]])
        lines += [markdown_table(["part", "values / pair", "test", "verdict"], rows), ""]
    return lines


def verdicts_by_rho_section(verdicts: Mapping[str, Mapping[str, RhoVerdict]]) -> list[str]:
    """Each claim's and control's estimate, CI and verdict at each ρ."""
    if not verdicts:
        return []
    rhos = list(dict.fromkeys(r for per_rho in verdicts.values() for r in per_rho))
    rows = []
    for key, per_rho in verdicts.items():
        cells = []
        for r in rhos:
            v = per_rho.get(r)
            digits = 6 if key == "lm_stage_beats_probe" else 4
            cells.append(
                "–" if v is None else f"{with_ci(v['estimate'], v['ci'], digits, signed=True)} {v['verdict']}"
            )
        rows.append([key, *cells])
    return [
        "### Claims and controls at each ρ",
        "",
        "ΔAUC of the paired features (claims), or Δ validation log loss of the joint run against its "
        "probe-only control (`lm_stage_beats_probe`: below 0 is better), with the 95% CI and verdict.",
        "",
        markdown_table(["claim / control", *(f"ρ={r}" for r in rhos)], rows),
        "",
    ]


def spread_section(spread: Mapping[str, SpreadAtRho]) -> list[str]:
    """Across seeds at each ρ: every claim's and control's estimates and verdicts per seed, and
    each feature's gain over E0 (mean ± sd)."""
    if not spread:
        return []
    lines = ["### Over seeds", ""]
    for rho, at_rho in spread.items():
        rows = []
        for key, value in at_rho.items():
            if key == "seeds" or isinstance(value, list):  # the seeds themselves
                continue
            sd = "–" if value.get("sd") is None else num(value["sd"], 6)
            verdicts = ", ".join(value.get("verdicts") or []) or "–"
            values = ", ".join(num(v, 6, signed=True) for v in value["values"])
            rows.append([key, values, num(value["mean"], 6, signed=True), sd, verdicts])
        lines += [
            f"ρ = {rho}, seeds {at_rho['seeds']}:",
            "",
            markdown_table(["measure", "per seed", "mean", "sd", "verdicts"], rows),
            "",
        ]
    return lines


def simulator_section(simulator: SimulatorSection) -> list[str]:
    series = simulator_series(simulator)
    header = ["feature", *(f"ρ={float(rho):g}" for rho in simulator["rho"])]
    lines = ["## Simulator sweep", ""]
    if simulator.get("predictions"):
        lines += predictions_section(simulator["predictions"])
    lines += verdicts_by_rho_section(simulator.get("verdicts_by_rho") or {})
    lines += spread_section(simulator.get("spread") or {})
    for measure, title in SWEEP_MEASURES.items():
        rows = [[feature, *(num(v) for v in values)] for feature, values in series[measure].items()]
        lines += [f"**{title}** by ρ:", "", markdown_table(header, rows), ""]
    trends = simulator.get("trends") or {}
    if trends:
        rows = [
            [
                name,
                num(t.get("spearman"), 2),
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
    lines += simulator_ceilings_section(simulator)
    return [*lines, f"![simulator sweep]({PLOTS['simulator']})", ""]


def simulator_ceilings_section(simulator: SimulatorSection) -> list[str]:
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
                num(o.get("auc")),
                num(n.get("auc")),
                num(e0.get("auc")),
                num(o.get("rig")),
                num(n.get("rig")),
                num(e0.get("rig")),
                num(entry.get("e0_rig_over_no_text_oracle_rig"), 3),
                "–" if near is None else ("yes" if near else "no"),
            ]
        )
    header = ["ρ", "oracle AUC", "no-text AUC", "E0 AUC", "oracle RIG", "no-text RIG", "E0 RIG"]
    header += ["E0 RIG / no-text RIG", "E0 near no-text oracle"]
    lines = ["**Ceilings** by ρ (test split):", "", markdown_table(header, rows), ""]
    shares = simulator_shares(simulator)
    header = ["feature", *(f"ρ={rho}" for rho in entries)]
    for metric, series in shares.items():
        table = [[name, *(num(v, 2) for v in values)] for name, values in series.items()]
        lines += [
            f"**Share of the text gain ({SHARE_LABELS[metric]})** by ρ:",
            "",
            markdown_table(header, table),
            "",
        ]
    if shares:
        lines += [f"![share of the text ceiling against ρ]({PLOTS['simulator_shares']})", ""]
    return lines
