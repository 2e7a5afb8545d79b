"""The report's text sections, one function per results.json section; every sentence about
significance is generated from the CI fields."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nlpctr.models.ceilings import CeilingSummary, OracleSummary
from nlpctr.models.claims import ClaimRecord
from nlpctr.models.increments import RedundancyMeasure
from nlpctr.models.redundancy import E2Curve
from nlpctr.models.report.formatting import (
    PLOTS,
    SHARE_LABELS,
    SHARE_NOTE,
    excludes_zero,
    interval_cell,
    markdown_table,
    num,
    ordered_runs,
    share_cell,
    share_metrics,
    with_ci,
)
from nlpctr.models.results import Control, RunEntry, StudentEntry, TeacherEntry
from nlpctr.models.split_half import SplitHalfSummary


def runs_section(runs: Mapping[str, RunEntry]) -> list[str]:
    rows = []
    for name in ordered_runs(runs):
        run = runs[name]
        calibration = run.get("calibration") or {}
        epochs = "–" if run.get("epochs") is None else f"{run['epochs']} ({run.get('best_epoch', '–')})"
        rows.append(
            [
                name,
                with_ci(run.get("auc"), run.get("auc_ci")),
                with_ci(run.get("gauc"), run.get("gauc_ci")),
                num(run.get("logloss"), 5),
                with_ci(run.get("rig"), run.get("rig_ci")),
                num(calibration.get("ratio"), 3),
                num(calibration.get("ece"), 4),
                with_ci(run.get("delta_auc_vs_baseline"), run.get("delta_auc_ci"), signed=True),
                with_ci(run.get("delta_rig_vs_baseline"), run.get("delta_rig_ci"), signed=True),
                with_ci(run.get("delta_gauc"), run.get("delta_gauc_ci"), signed=True),
                run.get("layers") if run.get("layers") is not None else "–",
                epochs,
                num(run.get("wall_seconds"), 0),
            ]
        )
    header = ["run", "AUC [95% CI]", "GAUC [95% CI]", "log loss", "RIG [95% CI]", "calib. ratio", "ECE"]
    header += ["ΔAUC vs E0 [95% CI]", "ΔRIG vs E0 [95% CI]", "ΔGAUC [95% CI]", "LM layers", "epochs (best)"]
    header.append("wall s")
    shares = share_metrics([runs[name] for name in ordered_runs(runs)])
    for row, name in zip(rows, ordered_runs(runs), strict=True):
        row += [share_cell(runs[name], metric) for metric in shares]
    header += [f"share ({SHARE_LABELS.get(m, m)}) [95% CI]" for m in shares]
    lines = ["## Runs", "", markdown_table(header, rows), ""]
    if shares:
        lines += [SHARE_NOTE, ""]
    return lines


def budget_section(runs: Mapping[str, RunEntry]) -> list[str]:
    """Each LM arm's width and budget: its LM, and per recipe stage the steps, rows, batch, rates
    and CPU seconds; compared arms (E2, E3, the probe-only control) share them by construction."""
    rows = []
    for name in ordered_runs(runs):
        run, encoder = runs[name], runs[name].get("encoder") or {}
        for stage, b in (run.get("budget") or {}).items():
            lr = b.get("lr") or {}
            rows.append(
                [
                    name,
                    f"{encoder.get('layers', '–')} ({encoder.get('trainable_layers', 'all')} trained)",
                    encoder.get("pair_reading", "–"),
                    stage,
                    b["steps"],
                    b["rows_seen"],
                    b["batch_size"],
                    f"head {num(lr.get('head'), 6)}, LM {num(lr.get('lm'), 6)}",
                    f"{b.get('warmup_steps', 0)} / {b.get('decay', 'none')}",
                    num(b.get("cpu_seconds"), 0),
                ]
            )
    if not rows:
        return []
    header = ["run", "LM layers", "pair reading", "stage", "steps", "rows seen", "batch", "learning rates"]
    header += ["warmup / decay", "CPU s"]
    return [
        "### Budgets",
        "",
        "What each LM arm trained with (`head`: the probe on the frozen LM; `lm`: the LM stage).",
        "",
        markdown_table(header, rows),
        "",
    ]


def joint_stages_section(runs: Mapping[str, RunEntry]) -> list[str]:
    """Per joint run and stage: steps, validation log loss at the stage's start and at its best."""
    baseline = (runs.get("baseline") or {}).get("best_valid_logloss")
    rows = []
    for name in ordered_runs(runs):
        for stage in runs[name].get("stages") or []:
            gain = None if baseline is None else stage["best_valid_logloss"] - baseline
            rows.append(
                [
                    name,
                    stage["name"],
                    stage["steps"],
                    num(stage["start_valid_logloss"], 6),
                    num(stage["best_valid_logloss"], 6),
                    stage["best_step"],
                    num(gain, 6, signed=True),
                ]
            )
    if not rows:
        return []
    header = ["run", "stage", "steps", "start valid log loss", "best valid log loss", "best at step"]
    intro = (
        "Validation log loss of each joint run by stage (`lm`: E0's tower frozen; `all`: everything trains)"
    )
    if baseline is not None:
        intro += f"; E0's best is {num(baseline, 6)}"
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


def significance_statements(runs: Mapping[str, RunEntry]) -> list[str]:
    """One line per run and metric whose difference from E0 has a CI, read from that CI."""
    lines = []
    for name in ordered_runs(runs):
        run = runs[name]
        for metric, value_key, ci_key in (
            ("AUC", "delta_auc_vs_baseline", "delta_auc_ci"),
            ("RIG", "delta_rig_vs_baseline", "delta_rig_ci"),
            ("GAUC", "delta_gauc", "delta_gauc_ci"),
        ):
            ci, value = run.get(ci_key), run.get(value_key)
            verdict = excludes_zero(ci)
            if verdict is None or value is None:
                continue
            if verdict:
                direction = "better" if value > 0 else "worse"
                lines.append(
                    f"- {name}: {metric} significantly {direction} than E0, "
                    f"{with_ci(value, ci, signed=True)} (the 95% CI excludes 0)."
                )
            else:
                lines.append(
                    f"- {name}: {metric} not significantly different from E0, "
                    f"{with_ci(value, ci, signed=True)}."
                )
    return lines


def claims_section(claims: Sequence[ClaimRecord]) -> list[str]:
    """The paper's claims first: each a paired ΔAUC with its CI, ΔRIG beside it, and the verdict,
    decided within one form (the features' score, or their vector) at one width."""
    rows = [
        [
            c["id"],
            c.get("form", "–"),
            (c.get("detail") or {}).get("dim", "–"),
            c["statement"],
            with_ci(c["estimate"], c["ci"], signed=True),
            with_ci(c.get("delta_rig"), c.get("delta_rig_ci"), signed=True),
            f"**{c['verdict']}**",
        ]
        for c in claims
    ]
    return [
        "## The paper's claims",
        "",
        "Each estimate is a paired difference in test ΔAUC with a group-bootstrap 95% CI; the verdict "
        "follows from the CI alone: *holds* when it excludes 0 on the claimed side, *contradicted* "
        "when it excludes 0 on the other side, *not significant* otherwise. Each claim compares two "
        "features in one form, at the width E0 receives (`dim`): `score` (the LM's 1-d click score) "
        "or `vector` (its pooled vector).",
        "",
        markdown_table(
            ["claim", "form", "dim", "statement", "ΔAUC [95% CI]", "ΔRIG [95% CI]", "verdict"], rows
        ),
        "",
    ]


def controls_section(controls: Sequence[Control]) -> list[str]:
    """Each learned part beside its simpler control: the joint run's LM stage against the probe
    alone, on validation log loss (paired CI), and their features added to E0 (test)."""
    if not controls:
        return []
    lines = ["## Controls: the LM stage against the probe-only control", ""]
    rows = []
    for c in controls:
        if "delta_valid_logloss" in c:
            rows.append(
                [
                    c["id"],
                    "–",
                    f"valid log loss {c['run']} − {c['control']}",
                    with_ci(c["delta_valid_logloss"], c["delta_valid_logloss_ci"], 6, signed=True),
                    with_ci(c.get("delta_valid_auc"), c.get("delta_valid_auc_ci"), signed=True),
                    f"**{c['verdict']}**",
                ]
            )
        else:
            rows.append(
                [
                    c["id"],
                    c.get("form", "–"),
                    "test ΔAUC / ΔRIG of E0 + joint feature − E0 + probe feature",
                    with_ci(c["estimate"], c["ci"], signed=True),
                    with_ci(c.get("delta_rig"), c.get("delta_rig_ci"), signed=True),
                    f"**{c['verdict']}**",
                ]
            )
    header = ["control", "form", "difference", "estimate [95% CI]", "ΔAUC / ΔRIG [95% CI]", "verdict"]
    return [*lines, markdown_table(header, rows), ""]


def redundancy_section(redundancy: Mapping[str, RedundancyMeasure]) -> list[str]:
    rows = [
        [
            m.get("feature", name),
            m.get("form", "–"),
            m.get("dim", "–"),
            m.get("kind", "–"),
            num(m.get("standalone_auc")),
            with_ci(m.get("delta_auc"), m.get("delta_auc_ci"), signed=True),
            with_ci(m.get("delta_rig"), m.get("delta_rig_ci"), signed=True),
            num(m.get("explained_fraction"), 3),
            num(m.get("explained_fraction_representation"), 3),
            num(m.get("cka"), 3),
        ]
        for name, m in redundancy.items()
    ]
    header = ["feature", "form", "dim", "kind", "standalone AUC", "ΔAUC [95% CI]", "ΔRIG [95% CI]"]
    header += ["explained (E0 inputs)", "explained (E0 representation)", "CKA vs E0"]
    shares = share_metrics(list(redundancy.values()))
    for row, entry in zip(rows, redundancy.values(), strict=True):
        row += [share_cell(entry, metric) for metric in shares]
    header += [f"share ({SHARE_LABELS.get(m, m)}) [95% CI]" for m in shares]
    return [
        "## Redundancy",
        "",
        "Every LM feature in two forms: its `vector` (the pooled vector E0 receives as a cascade "
        "input) and its `score` (a 1-d click score: the LM's own head where it was trained with one, "
        "else a probe head fitted on its vectors with E0 frozen). Explained fraction: held-out R² of "
        "a ridge probe predicting the feature (its top principal components for a vector) from E0's "
        "inputs or E0's penultimate layer, weighted by impressions; negative when the probe does "
        "worse than the mean.",
        "",
        markdown_table(header, rows),
        "",
        f"![explained fraction per feature]({PLOTS['redundancy']})",
        "",
    ]


def e2_section(curve: E2Curve) -> list[str]:
    forms = list(curve.get("forms") or {})
    rows = []
    for p in curve["points"]:
        row = [p["checkpoint"], num(p.get("valid_auc_standalone"))]
        for form in forms:
            row += [num(p[form]["delta_auc"], signed=True), num(p[form]["delta_rig"], signed=True)]
        rows.append([*row, "yes" if p.get("chosen") else ""])
    header = ["checkpoint", "standalone valid AUC"]
    for form in forms:
        header += [f"ΔAUC ({form})", f"ΔRIG ({form})"]
    lines = ["## E2: standalone AUC against incremental gain", ""]
    lines += [
        "Checkpoints every quarter epoch of the LM stage; `step-0` is the probe's head on the frozen "
        "LM. The chosen one has the peak standalone validation AUC (E2's rule).",
        "",
        markdown_table([*header, "peak AUC"], rows),
        "",
    ]
    rising = "was still rising" if curve.get("valid_auc_rising_at_end") else "was not rising"
    lines.append(f"At the last checkpoint the standalone validation AUC {rising}.")
    for form, verdict in (curve.get("forms") or {}).items():
        answer = "is" if verdict["peak_auc_is_best_feature"] else "is not"
        lines.append(
            f"In the {form} form, the peak-AUC checkpoint ({curve['peak_auc_checkpoint']}) {answer} the one "
            f"that adds most to E0 on validation ({verdict['best_valid_feature_checkpoint']}); on test the "
            f"best ΔAUC is at {verdict['best_test_delta_auc_checkpoint']}."
        )
    return [*lines, "", f"![E2 curve]({PLOTS['e2_curve']})", ""]


def distillation_section(distillation: Mapping[str, StudentEntry], teacher: TeacherEntry | None) -> list[str]:
    lines = ["## Distillation", ""]
    forms = [f for f in ("score", "vector") if any(f in e for e in distillation.values())]
    if teacher:
        gains = "; ".join(
            f"{form} " + with_ci(t["feature_delta_auc"], t["feature_delta_auc_ci"], signed=True)
            for form, t in ((form, teacher[form]) for form in forms if form in teacher)
        )
        lines += [
            f"Teacher: run {teacher.get('run', '–')} ({teacher.get('selected_by', 'configured')}), "
            f"{teacher.get('layers', '–')} layers; end to end AUC {num(teacher.get('auc'))}, RIG "
            f"{num(teacher.get('rig'))}; as a feature added to E0, ΔAUC {gains}. "
            "Each student is judged as a feature added to E0 in both forms; conversion rate = the "
            "student feature's gain over E0 / the teacher feature's gain in the same form, with a "
            "paired group-bootstrap CI.",
            "",
        ]
        nothing = [f for f, v in (teacher.get("nothing_to_distil") or {}).items() if v]
        if nothing:
            lines += [
                f"**Nothing to distil** in the {' and '.join(nothing)} form: the teacher feature's gain "
                "over E0 has a CI that includes 0 (or lies below it), so no conversion rate is given.",
                "",
            ]
    entries = sorted(distillation.items(), key=lambda item: (item[1]["method"], item[1]["layers"]))
    rows = []
    for name, e in entries:
        for form in forms:
            f = e.get(form) or {}
            rows.append(
                [
                    name,
                    e["method"],
                    e["layers"],
                    form,
                    f.get("dim", "–"),
                    num(e.get("auc")),
                    with_ci(e.get("delta_auc"), e.get("delta_auc_ci"), signed=True),
                    with_ci(f.get("feature_delta_auc"), f.get("feature_delta_auc_ci"), signed=True),
                    num(f.get("feature_delta_rig"), signed=True),
                    with_ci(f.get("conversion_auc"), f.get("conversion_auc_ci"), 2),
                    with_ci(f.get("conversion_rig"), f.get("conversion_rig_ci"), 2),
                    num(e.get("rows_per_s"), 0),
                    num(e.get("teacher_rows_per_s"), 0),
                ]
            )
    header = ["student", "method", "layers", "form", "dim", "AUC", "ΔAUC end to end [95% CI]"]
    header += ["feature ΔAUC [95% CI]", "feature ΔRIG", "conversion (AUC) [95% CI]"]
    header += ["conversion (RIG) [95% CI]", "texts/s", "teacher texts/s"]
    return [
        *lines,
        markdown_table(header, rows),
        "",
        f"![student feature gain over E0]({PLOTS['conversion']})",
        "",
    ]


def ceilings_section(ceilings: CeilingSummary, runs: Mapping[str, RunEntry]) -> list[str]:
    """How far E0 is from a ceiling: the simulator's oracles, or on real data the split half."""
    base = runs.get("baseline")
    if ceilings.get("kind") == "simulated":
        return ["## Ceilings", "", *_simulated_ceilings(ceilings, base), ""]
    return ["## Ceilings", "", *_split_half_ceiling(ceilings, base), ""]


def _simulated_ceilings(ceilings: OracleSummary, base: RunEntry | None) -> list[str]:
    """The Bayes and no-text oracles beside E0, the text gain between them and E0's share of it."""
    lines = [
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
                with_ci(card.get("auc"), card.get("auc_ci")),
                num(card.get("logloss"), 5),
                with_ci(card.get("rig"), card.get("rig_ci")),
                with_ci(card.get("gauc"), card.get("gauc_ci")),
            ]
        )
    if base:
        rows.append(
            [
                "E0 (baseline)",
                with_ci(base.get("auc"), base.get("auc_ci")),
                num(base.get("logloss"), 5),
                with_ci(base.get("rig"), base.get("rig_ci")),
                with_ci(base.get("gauc"), base.get("gauc_ci")),
            ]
        )
    gain = ceilings.get("text_gain") or {}
    rows.append(
        [
            "text gain (oracle − no-text)",
            interval_cell(gain.get("auc"), signed=True),
            interval_cell(gain.get("logloss"), 5, signed=True),
            interval_cell(gain.get("rig"), signed=True),
            interval_cell(gain.get("gauc"), signed=True),
        ]
    )
    header = ["scores", "AUC [95% CI]", "log loss", "RIG [95% CI]", "GAUC [95% CI]"]
    lines += [markdown_table(header, rows), ""]
    if ceilings.get("e0_rig_over_no_text_oracle_rig") is not None:
        near = "is" if ceilings.get("e0_near_no_text_oracle") else "is not"
        lines.append(
            f"E0's RIG is {num(ceilings['e0_rig_over_no_text_oracle_rig'], 3)} × the no-text oracle's: "
            f"E0 {near} near its no-text oracle ({ceilings.get('e0_near_criterion', '')})."
        )
    e0_share = ceilings.get("e0_share_of_text_gain") or {}
    if e0_share:
        cells = ", ".join(f"{SHARE_LABELS.get(m, m)} {interval_cell(v, 2)}" for m, v in e0_share.items())
        lines.append(f"E0's own share of the text gain (E0 − no-text oracle, over the gap): {cells}.")
    return lines


def _split_half_ceiling(ceilings: SplitHalfSummary, base: RunEntry | None) -> list[str]:
    """Real data: the split-half ceiling beside E0 and random scores, and whether it applies."""
    half = ceilings.get("split_half") or {}
    in_sample, noise = half.get("in_sample") or {}, half.get("random") or {}
    lines = [
        "No truth on real data: the split-half ceiling splits each item's test impressions in two "
        "(clicks drawn hypergeometrically), scores one half by the other half's CTR (shrunk toward "
        "its mean) and measures AUC and GAUC there. It includes every non-text cause of an item's "
        "CTR, and a half's CTR is noisy, so it is a rough ceiling, not a bound.",
        "",
    ]
    rows = [
        [
            f"split half (seed {half.get('seed')})",
            with_ci(half.get("auc"), half.get("auc_ci")),
            with_ci(half.get("gauc"), half.get("gauc_ci")),
        ],
        [
            "in sample (optimistic)",
            num(in_sample.get("auc")),
            num(in_sample.get("gauc")),
        ],
        ["random scores", num(noise.get("auc")), num(noise.get("gauc"))],
    ]
    if base:
        rows.append(
            [
                "E0 (baseline)",
                with_ci(base.get("auc"), base.get("auc_ci")),
                with_ci(base.get("gauc"), base.get("gauc_ci")),
            ]
        )
    gap = ceilings.get("e0_gap") or {}
    if gap:
        gap_cells = [interval_cell(gap.get(m), signed=True) for m in ("auc", "gauc")]
        rows.append(["gap (split half − E0)", *gap_cells])
    lines += [markdown_table(["scores", "AUC [95% CI]", "GAUC [95% CI]"], rows), ""]
    applies = "applies" if half.get("applicable") else "does not apply"
    lines.append(
        f"Items: {half.get('item', '–')}, {half.get('items', '–')} of them; "
        f"{num(100 * (half.get('splittable_impression_share') or 0.0), 1)}% of the test impressions are on "
        f"items shown at least twice; the ceiling {applies}."
    )
    for metric, verdict in (ceilings.get("meaningful") or {}).items():
        if verdict is not True:
            reason = verdict.get("reason") if isinstance(verdict, Mapping) else ""
            lines.append(f"No share of the {metric.upper()} gap: {reason}.")
    return lines
