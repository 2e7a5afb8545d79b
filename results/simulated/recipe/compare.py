"""Paired comparisons of the LM-stage variants of run.sh: per rho, each variant's validation log
loss against the one it changes (and against the probe-only control), with a group-bootstrap 95%
CI (1,000 rounds, groups = queries) on the validation rows; writes comparisons.json and .md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from nlpctr.layout import read_manifest
from nlpctr.models import metrics
from nlpctr.models.ceilings import oracle_probabilities
from nlpctr.models.evaluation import EvaluationConfig, paired_delta

# (variant, what it changes, the variant it is compared with)
LADDER = [
    ("today", "the LM stage before: batch 32, 300 steps, LM lr 2e-5, constant", "probe32"),
    ("schedule", "+ warmup (30 steps) and linear decay", "today"),
    (
        "rows32",
        "+ a whole epoch at batch 32 (1,250 steps, 40,000 rows: the epoch caps the 6,400 asked)",
        "schedule",
    ),
    ("batch1024", "batch 1024 for 5 epochs (200 steps, 200,000 rows)", "rows32"),
    ("lr", "+ head lr 1e-3, LM lr 3e-4", "batch1024"),
    ("bf16", "+ bf16 autocast of the trained layer", "lr"),
    ("layers2", "+ the top 2 layers trained", "bf16"),
    ("noprobe", "bf16 without the probe (head from zero)", "bf16"),
    ("cold", "joint from the start: no E0 warm start", "bf16"),
    ("steps400", "+ twice the LM steps (10 epochs of 40: 400 steps, 400,000 rows)", "bf16"),
    ("lm1e4", "the LM at a peak lr of 1e-4 instead of 3e-4 (its start rises half as much)", "bf16"),
    ("ema95", "+ validated and kept on an average of the LM stage's weights (EMA, decay 0.95)", "bf16"),
    ("ema95lr1e3", "+ the average (EMA, decay 0.95) and the LM at a peak lr of 1e-3", "bf16"),
    ("ema95layers2", "ema95 with the top 2 layers trained", "ema95"),
    ("lr1e3", "the LM at a peak lr of 1e-3, no average (ema95lr1e3 without it)", "bf16"),
]
EVALUATION = EvaluationConfig(bootstrap_rounds=1000, bootstrap_seed=0)
# the recipe the ladder arrives at (models/configs/default.yaml): judged against its probe over seeds
FINAL = "ema95lr1e3"
# judged against the probe at every seed too: the ladder's recipe before the average, its longer
# variant, and the recipe with the average at a higher LM rate
ACROSS_SEEDS = ("bf16", "steps400", "ema95lr1e3")
# 40-step runs of the LM stage's start at seed 1, rho 0 (start/README.md): as bf16, without the LM's
# dropout, with the head at lr 1e-4, with the LM at lr 1e-4 and 3e-5
START_VARIANTS = ("d_base", "d_nodrop", "d_headlow", "d_lmlow", "d_lm3e5")
EARLY = 50  # LM steps: the window in which lm_start looks for the start's disruption


def split_rows(data: Path, split: str) -> tuple[pd.DataFrame, str]:
    group = read_manifest(data)["group"]
    rows = ds.dataset(data / "impressions", format="parquet").to_table().to_pandas()
    rows = rows[rows["split"] == split].sort_values("impression_id").set_index("impression_id")
    return rows, group


def labels_of(rows: pd.DataFrame, group: str) -> metrics.Labels:
    return metrics.Labels(
        rows["impressions"].to_numpy(np.int64), rows["clicks"].to_numpy(np.int64), rows[group].to_numpy()
    )


def predictions(run: Path, index: pd.Index) -> np.ndarray:
    saved = pd.read_parquet(run / "predictions.parquet").set_index("impression_id")["p"]
    p = saved.reindex(index).to_numpy()
    if np.isnan(p).any():
        raise SystemExit(f"{run} lacks predictions of some rows of the split: rerun it")
    return p


def run_facts(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    stages = {s["name"]: s for s in results["stages"]}
    lm = stages.get("lm") or stages.get("all") or {}
    return {
        "best_valid_logloss": results["best_valid_logloss"],
        "probe_best_valid_logloss": (stages.get("head") or {}).get("best_valid_logloss"),
        "lm_steps": lm.get("steps", 0),
        "lm_rows_seen": lm.get("rows_seen", 0),
        "lm_best_step": lm.get("best_step"),
        "lm_cpu_seconds": lm.get("cpu_seconds"),
        "lm_wall_seconds": lm.get("wall_seconds"),
        "stages": results["stages"],
        "lm_start": lm_start(results["history"]),
    }


def lm_start(history: list[dict]) -> dict | None:
    """How the LM stage's first steps move validation log loss from where the probe left it: the
    change at its first evaluation and its worst within `EARLY` steps, the steps it takes to get
    back below its start, and its best; None for a run without an LM stage."""
    lm = [e for e in history if e.get("stage") not in (None, "head")]
    if len(lm) < 2:
        return None
    start, first = lm[0]["step"], lm[0]["valid_logloss"]
    early = [e["valid_logloss"] - first for e in lm[1:] if e["step"] - start <= EARLY] or [
        lm[1]["valid_logloss"] - first
    ]
    back = next((e["step"] - start for e in lm[1:] if e["valid_logloss"] < first), None)
    return {
        "start_valid_logloss": first,
        "first_eval_step": lm[1]["step"] - start,
        "first_eval_change": lm[1]["valid_logloss"] - first,
        "worst_early_change": max(early),
        "steps_back_below_start": back,
        "best_change": min(e["valid_logloss"] for e in lm) - first,
    }


def facts_autocast(run: Path) -> bool:
    """Whether the run's LM ran its trained layers in bf16 autocast (its probe read those vectors)."""
    return json.loads((run / "results.json").read_text())["encoder"]["autocast"] is not None


def delta(labels: metrics.Labels, a: np.ndarray, b: np.ndarray, train_ctr: float) -> dict:
    """Validation log loss of a minus b (below 0: a is better), paired group-bootstrap CI."""
    d = paired_delta(labels, a, b, train_ctr, EVALUATION)
    scale = -metrics.entropy(train_ctr)
    low, high = sorted(scale * v for v in d["delta_rig_ci"])
    return {"delta": scale * d["delta_rig"], "ci": [low, high], "better": high < 0, "worse": low > 0}


def compare(rho_dir: Path) -> dict:
    rows, group = split_rows(rho_dir / "data", "valid")
    labels = labels_of(rows, group)
    runs = rho_dir / "runs"
    train_ctr = float(json.loads((runs / "baseline" / "run.json").read_text())["train_ctr"])
    names = ["baseline", "probe", "probe32", *(v for v, _, _ in LADDER), *START_VARIANTS]
    p = {n: predictions(runs / n, rows.index) for n in names if (runs / n / "results.json").is_file()}
    out = {"runs": {n: run_facts(runs / n) for n in p if n != "baseline"}, "comparisons": []}
    out["probe_vs_e0"] = delta(labels, p["probe"], p["baseline"], train_ctr)
    out["ceiling"] = ceiling(rho_dir, rows.index, labels, p)
    for variant, change, base in LADDER:
        if variant not in p:
            continue
        entry = {"variant": variant, "change": change, "against": base if base in p else None}
        entry["vs_against"] = delta(labels, p[variant], p[base], train_ctr) if base in p else None
        # the probe that read the same frozen vectors (bf16 or fp32 layers); where that one was not
        # run (rho 0.5 has no fp32 probe), the other, named in the entry
        control = "probe" if facts_autocast(runs / variant) or "probe32" not in p else "probe32"
        entry["probe"] = control
        entry["vs_probe"] = delta(labels, p[variant], p[control], train_ctr)
        out["comparisons"].append(entry)
    # The test split, which no selection saw (the recipe and each run's best state were chosen on
    # validation): the same comparison against the probe, as a check on that selection.
    test, _ = split_rows(rho_dir / "data", "test")
    test_labels, test_probe = labels_of(test, group), predictions(runs / "probe", test.index)
    out["test_vs_probe"] = {
        v: delta(test_labels, predictions(runs / v, test.index), test_probe, train_ctr)
        for v in ACROSS_SEEDS
        if v in p
    }
    return out


def ceiling(rho_dir: Path, index: pd.Index, labels: metrics.Labels, p: dict[str, np.ndarray]) -> dict:
    """Validation log loss of the simulator's Bayes oracle and no-text oracle beside E0's, the
    probe's and the final recipe's; `share` = (E0 - run) / (no-text oracle - oracle): the part of
    the text's log-loss gap a run closes (E0 is near its no-text oracle here)."""
    oracle, no_text = oracle_probabilities(rho_dir / "log" / "log.truth.parquet", list(index))
    loss = {"oracle": metrics.logloss(labels, oracle), "no_text_oracle": metrics.logloss(labels, no_text)}
    loss |= {n: metrics.logloss(labels, p[n]) for n in ("baseline", "probe", *ACROSS_SEEDS) if n in p}
    gap = loss["no_text_oracle"] - loss["oracle"]
    share = {n: (loss["baseline"] - loss[n]) / gap for n in ("probe", *ACROSS_SEEDS) if n in loss}
    return {"valid_logloss": loss, "text_gap": gap, "share": share}


def over_seeds(results: dict) -> dict:
    """Per variant of ACROSS_SEEDS and rho, its validation log loss minus its probe's, per seed run."""
    out: dict = {}
    for key, result in results.items():
        rho = key.rsplit("rho-", 1)[-1]
        for c in result["comparisons"]:
            if c["variant"] in ACROSS_SEEDS:
                test = result["test_vs_probe"][c["variant"]]
                entry = {"run": key, **c["vs_probe"], "test": test}
                out.setdefault(c["variant"], {}).setdefault(rho, []).append(entry)
    return out


def markdown(results: dict) -> str:
    named = ", ".join(f"`{v}`" for v in ACROSS_SEEDS)
    lines = [f"### {named} against the probe-only control, per seed (final recipe: `{FINAL}`)", ""]
    lines += ["| variant | rho | run | Δ valid log loss [95% CI] | Δ test log loss [95% CI] |"]
    lines.append("|---|---|---|---|---|")
    for variant, by_rho in over_seeds(results).items():
        for rho, entries in by_rho.items():
            lines += [f"| {variant} | {rho} | {e['run']} | {fmt(e)} | {fmt(e['test'])} |" for e in entries]
    lines.append("")
    lines += start_table(results)
    for key, result in results.items():
        probe, c = result["probe_vs_e0"], result["ceiling"]
        lines += [f"### {key}", "", f"Probe-only control vs E0: {fmt(probe)}."]
        lines.append(
            f"Ceiling: oracle {c['valid_logloss']['oracle']:.5f}, no-text oracle "
            f"{c['valid_logloss']['no_text_oracle']:.5f}, E0 {c['valid_logloss']['baseline']:.5f}; share of "
            "the text gap closed: " + ", ".join(f"{n} {v:.1%}" for n, v in c["share"].items()) + "."
        )
        lines.append("")
        lines += [
            "| variant | change | against | Δ valid log loss vs it [95% CI] | probe | vs the probe [95% CI] "
            "| LM steps | rows | CPU s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for c in result["comparisons"]:
            facts = result["runs"][c["variant"]]
            cpu = facts["lm_cpu_seconds"]
            lines.append(
                f"| {c['variant']} | {c['change']} | {c['against'] or '-'} | {fmt(c['vs_against'])} "
                f"| {c['probe']} | {fmt(c['vs_probe'])} | {facts['lm_steps']} | {facts['lm_rows_seen']:,} "
                f"| {cpu:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def start_table(results: dict) -> list[str]:
    """The LM stage's first steps, per run of ACROSS_SEEDS, layers2 and START_VARIANTS, as markdown."""
    lines = [
        f"### The LM stage's start: validation log loss against the probe's state (first {EARLY} steps)",
        "",
        "| run | variant | first evaluation (step) | worst early | steps back below the start | best |",
        "|---|---|---|---|---|---|",
    ]
    for key, result in results.items():
        for variant in (*ACROSS_SEEDS, "layers2", "ema95", "lr1e3", *START_VARIANTS):
            start = result["runs"].get(variant, {}).get("lm_start")
            if start is None:
                continue
            back = start["steps_back_below_start"]
            lines.append(
                f"| {key} | {variant} | {start['first_eval_change']:+.5f} ({start['first_eval_step']}) "
                f"| {start['worst_early_change']:+.5f} | {back if back is not None else 'never'} "
                f"| {start['best_change']:+.5f} |"
            )
    return [*lines, ""]


def fmt(d: dict | None) -> str:
    if d is None:
        return "-"
    verdict = "better" if d["better"] else "worse" if d["worse"] else "n.s."
    return f"{d['delta']:+.6f} [{d['ci'][0]:+.6f}, {d['ci'][1]:+.6f}] {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/recipe"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args()
    # seed 0 in rho-<r>, further seeds in seed-<s>/rho-<r> (run.sh's SEED)
    folders = sorted(args.runs.glob("rho-*")) + sorted(args.runs.glob("seed-*/rho-*"))
    results = {str(d.relative_to(args.runs)): compare(d) for d in folders}
    payload = {"runs": results, "final_vs_probe": over_seeds(results)}
    (args.out / "comparisons.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "comparisons.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
